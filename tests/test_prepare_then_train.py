"""`audiocraft-lora prepare` output is what the solver trains on: validated, then a training step runs."""
import numpy as np
import soundfile as sf
import torch

from audiocraft_lora.data.prepare import prepare_dataset
from helpers import DEBUG_ARGS, build_solver


def test_prepared_folder_trains(dora_dir, tmp_path):
    source = tmp_path / 'my beats'
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # stereo 44.1 kHz, non-ASCII names, captions in sibling .txt files
        t = np.arange(int(3.5 * 44100)) / 44100
        wav = 0.3 * np.sin(2 * np.pi * 55 * (i + 1) * t) * (1 + 0.1 * rng.standard_normal(t.shape))
        sf.write(source / f'节拍_{i}.wav', np.stack([wav, wav], axis=1), 44100)
        (source / f'节拍_{i}.txt').write_text(f'trap beat number {i}, 808 bass', encoding='utf-8')
    prepared = prepare_dataset(source, 'mybeats', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                               valid_ratio=0.34, seed=0)
    assert prepared.dset_yaml.exists()
    args = DEBUG_ARGS + [f'datasource.{split}={path.parent}' for split, path in prepared.manifests.items()]
    args += [f'dataset.segment_duration={min(prepared.suggested_segment_duration, 3)}', 'dataset.batch_size=2']
    solver, _ = build_solver(args)  # validate_data=true: every prepared entry is checked first
    audio, infos = next(iter(solver.dataloaders['train']))
    assert audio.shape[1] == 1  # stereo 44.1 kHz converted to the base's mono 32 kHz by AudioCraft's dataset
    # (MusicDataset may merge other fields into the text or drop it: AudioCraft's text augmentation)
    assert all('trap beat number' in info.description for info in infos if info.description)
    solver._current_stage = 'train'
    solver.model.train()
    metrics = solver.run_step(0, (audio, infos), {})
    solver._current_stage = None
    assert torch.isfinite(metrics['ce'])


def test_clips_padded_on_disk_stop_training_unless_silence_is_allowed(dora_dir, tmp_path):
    """The user's story: 15 s clips padded with silence to 30 s in the files. The solver's check refuses them before
    any step (naming the file, the silence and `--trim-silence`); `allow_silence=true` accepts them, as warnings."""
    import pytest
    from audiocraft_lora.errors import DataError
    source = tmp_path / 'padded'
    source.mkdir()
    for i in range(4):
        t = np.arange(3 * 32000) / 32000
        wav = np.concatenate([0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t), np.zeros(3 * 32000)])  # half silence
        sf.write(source / f'beat_{i}.wav', wav, 32000)
        (source / f'beat_{i}.txt').write_text(f'trap beat {i}')
    prepared = prepare_dataset(source, 'padded', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                               valid_ratio=0.5, seed=0)
    args = DEBUG_ARGS + [f'datasource.{split}={path.parent}' for split, path in prepared.manifests.items()]
    args += ['dataset.segment_duration=3', 'dataset.batch_size=2']
    with pytest.raises(DataError, match=r'(?s)beat_\d\.wav.*3\.0 s of trailing silence.*--trim-silence'):
        build_solver(args)
    solver, _ = build_solver(args + ['allow_silence=true'])
    assert solver.model is not None
