"""Training-time samples are written raw (clamped at full scale), as `generate` and `compare` write theirs."""
import pytest
import soundfile
import torch


@pytest.fixture(scope='module')
def audio_settings(tmp_path_factory):
    from audiocraft_lora import train
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('AUDIOCRAFT_LORA_DORA_DIR', str(tmp_path_factory.mktemp('dora')))
        return {recipe: dict(train.main.get_xp([f'solver=musicgen/{recipe}']).cfg.generate.audio)
                for recipe in ('lora_debug', 'lora_small', 'lora_melody')}


def test_recipes_write_samples_with_the_clip_strategy_and_no_headroom(audio_settings):
    for recipe, settings in audio_settings.items():
        assert settings['strategy'] == 'clip' and settings['peak_clip_headroom_db'] == 0, (recipe, settings)


def test_audiocraft_writes_a_quiet_sample_at_its_own_level(audio_settings, tmp_path):
    """With these settings AudioCraft's audio_write (the sample manager's) keeps a -40 dB sample at -40 dB and
    clamps at 1.0; the old 'loudness' strategy lifted every sample to -14 LUFS."""
    from audiocraft.data.audio import audio_write
    settings = audio_settings['lora_debug']
    sample_rate = settings['sample_rate']
    times = torch.arange(sample_rate) / sample_rate
    quiet = 0.01 * torch.sin(2 * torch.pi * 440 * times)[None]
    loud = 1.9 * torch.sin(2 * torch.pi * 440 * times)[None]
    for name, wav, expected_peak in (('quiet', quiet, 0.01), ('loud', loud, 1.0)):
        path = audio_write(tmp_path / name, wav, **settings)
        data, _ = soundfile.read(path)
        assert abs(data).max() == pytest.approx(expected_peak, rel=0.01), name
