"""Diagnostics on synthetic signals whose answers are known in closed form."""
import json
import math

import numpy as np
import pytest
import torch

from audiocraft_lora import diagnostics as D
from audiocraft_lora.errors import UserError

TONE_RMS_DBFS = 20 * math.log10(0.5 / math.sqrt(2))  # -9.03
LINEAR_FADE_RATIO_DB = -10 * math.log10(19)  # power of last third / first third of a linear fade = 1/19


@pytest.fixture(scope='module')
def diags(signals, sample_rate):
    return {name: D.audio_diagnostics(wav, sample_rate) for name, wav in signals.items()}


@pytest.mark.parametrize('name,expected_flags', [
    ('steady', []), ('fading', ['fades']), ('stops_half_way', ['fades', 'silent_tail']),
    ('white_noise', ['noise_like']), ('clipped_square', ['clipping']), ('silence', ['mostly_silent', 'silent_tail'])])
def test_flags_distinguish_the_signals(diags, name, expected_flags):
    assert D.flags(diags[name]) == expected_flags


def test_steady_tone(diags):
    d = diags['steady']
    assert d.loudness_unit == 'LUFS' and len(d.loudness_curve) == 8  # 4 s / 0.5 s
    assert d.rms_curve_dbfs == pytest.approx([TONE_RMS_DBFS] * 8, abs=0.01)
    assert d.peak_dbfs == pytest.approx(-6.02, abs=0.01)
    assert abs(d.fade_ratio_db) < 0.05
    assert d.silence_fraction == 0.0 and d.tail_silence_s == 0.0 and d.clipping_fraction == 0.0
    assert d.spectral_flatness < 0.01
    # Windowed LUFS of a steady signal equals its integrated LUFS (one K-weighting pass, no filter restart).
    assert d.loudness_curve == pytest.approx([d.integrated_lufs] * 8, abs=0.1)


def test_full_scale_sine_reads_minus_3_lufs_and_clips_where_expected():
    sample_rate = 48000  # BS.1770's reference: a 0 dBFS 997 Hz sine reads -3.01 LUFS
    wav = np.sin(2 * np.pi * 997 * np.arange(2 * sample_rate) / sample_rate)
    d = D.audio_diagnostics(wav, sample_rate)
    assert d.integrated_lufs == pytest.approx(-3.01, abs=0.05)
    assert d.clipping_fraction == pytest.approx(2 * math.acos(0.999) / math.pi, abs=0.002)  # |sin| >= 0.999


def test_linear_fade(diags):
    d = diags['fading']
    assert d.fade_ratio_db == pytest.approx(LINEAR_FADE_RATIO_DB, abs=0.05)
    assert np.all(np.diff(d.loudness_curve) < 0)
    assert d.silence_fraction == 0.0


def test_tone_that_stops_half_way(diags):
    d = diags['stops_half_way']
    assert d.silence_fraction == pytest.approx(0.5, abs=0.07)
    assert d.tail_silence_s == pytest.approx(2.0, abs=0.02)
    assert d.fade_ratio_db < -60
    assert d.loudness_curve[0] == pytest.approx(diags['steady'].loudness_curve[0], abs=0.1)
    assert d.loudness_curve[-1] == D.DB_FLOOR


def test_white_noise_is_flat_and_tone_is_not(diags):
    assert 0.5 < diags['white_noise'].spectral_flatness < 0.62  # theory: exp(-euler_gamma) = 0.56
    assert diags['steady'].spectral_flatness < 0.01
    assert abs(diags['white_noise'].fade_ratio_db) < 0.5


def test_clipping(diags, sample_rate):
    assert diags['clipped_square'].clipping_fraction > 0.95
    times = np.arange(4 * sample_rate) / sample_rate
    overdriven = np.clip(2.0 * np.sin(2 * np.pi * 50 * times), -1.0, 1.0)  # |2 sin| >= 1 two thirds of the time
    assert D.audio_diagnostics(overdriven, sample_rate).clipping_fraction == pytest.approx(2 / 3, abs=0.01)
    # A configurable threshold: nothing reaches 1.5 ...
    assert D.audio_diagnostics(overdriven, sample_rate, clip_threshold=1.5).clipping_fraction == 0.0


def test_silence_is_finite_and_serialisable(diags):
    d = diags['silence']
    values = d.to_dict()
    json.dumps(values, allow_nan=False)  # raises on NaN / inf
    assert d.silence_fraction == 1.0 and d.tail_silence_s == pytest.approx(4.0)
    assert d.integrated_lufs == D.DB_FLOOR and d.peak_dbfs == D.DB_FLOOR
    assert d.fade_ratio_db == 0.0 and d.spectral_flatness == 0.0  # silent frames don't count as noise
    assert all(v == D.DB_FLOOR for v in d.loudness_curve + d.rms_curve_dbfs)


def test_silence_threshold_is_configurable(signals, sample_rate):
    quiet = signals['steady'] * 10 ** (-50 / 20)  # RMS ~ -59 dBFS
    assert D.audio_diagnostics(quiet, sample_rate).silence_fraction == 0.0
    assert D.audio_diagnostics(quiet, sample_rate, silence_threshold_dbfs=-50).silence_fraction == 1.0


def test_short_windows_fall_back_to_rms(signals, sample_rate):
    d = D.audio_diagnostics(signals['fading'], sample_rate, window_s=0.25)
    assert d.loudness_unit == 'dBFS' and len(d.loudness_curve) == 16
    assert d.loudness_curve == d.rms_curve_dbfs
    assert d.window_times_s[0] == pytest.approx(0.125)


def test_stereo_and_torch_match_mono_numpy(signals, sample_rate):
    mono = signals['fading'].astype(np.float32)
    reference = D.audio_diagnostics(mono, sample_rate).to_dict()
    inputs = {'torch [T]': torch.from_numpy(mono), 'torch [1, T]': torch.from_numpy(mono)[None],
              'numpy dual mono': np.stack([mono, mono]), 'torch dual mono': torch.from_numpy(np.stack([mono, mono]))}
    for label, wav in inputs.items():
        values = D.audio_diagnostics(wav, sample_rate).to_dict()
        stereo = values['num_channels'] == 2
        for key in D.SCALAR_METRICS + ('rms_curve_dbfs', 'window_times_s'):
            if key == 'integrated_lufs' and stereo:
                continue
            assert values[key] == pytest.approx(reference[key], abs=1e-6), (label, key)
        # BS.1770 sums channel powers: identical stereo channels read +3.01 LU.
        offset = 10 * math.log10(2) if stereo else 0.0
        assert values['integrated_lufs'] == pytest.approx(reference['integrated_lufs'] + offset, abs=0.01), label
        assert values['loudness_curve'] == pytest.approx(np.add(reference['loudness_curve'], offset), abs=0.01)


@pytest.mark.parametrize('wav,message', [
    (np.zeros(16000, dtype=np.int16), 'float'),
    (np.zeros((16000, 2)), 'Transpose'),
    (np.zeros((1, 1, 16000)), 'one sample at a time'),
    (np.array([0.0] * 8000 + [np.nan] * 8000), 'NaN'),
    (np.zeros(1000), 'at least'),
    ([0.0] * 16000, 'numpy array or torch tensor'),
])
def test_bad_input_raises_user_error(wav, message, sample_rate):
    with pytest.raises(UserError, match=message):
        D.audio_diagnostics(wav, sample_rate)


def test_aggregate_and_compare_to_base(diags):
    base = D.aggregate([diags['steady'], diags['steady']])
    adapter = D.aggregate([diags['steady'].to_dict(), diags['fading'], diags['silence']])  # dicts work too
    assert adapter['count'] == 3
    fades = [0.0, diags['fading'].fade_ratio_db, 0.0]
    assert adapter['metrics']['fade_ratio_db']['mean'] == pytest.approx(np.mean(fades), abs=0.05)
    assert adapter['metrics']['fade_ratio_db']['median'] == pytest.approx(0.0, abs=0.05)
    assert adapter['flag_rates'] == pytest.approx({'fades': 1 / 3, 'mostly_silent': 1 / 3, 'noise_like': 0.0,
                                                   'clipping': 0.0, 'silent_tail': 1 / 3})
    comparison = D.compare_to_base(base, adapter)
    assert comparison['metrics']['fade_ratio_db']['diff'] == pytest.approx(np.mean(fades), abs=0.1)
    assert comparison['metrics']['silence_fraction']['diff'] == pytest.approx(1 / 3)
    assert comparison['flag_rates']['fades'] == pytest.approx({'base': 0.0, 'other': 1 / 3, 'diff': 1 / 3})
    with pytest.raises(UserError):
        D.aggregate([])


def test_flag_thresholds_are_configurable(diags):
    assert D.flags(diags['fading'], D.FlagThresholds(fade_db=-20.0)) == []


def test_summary_for_logging_and_fade_warning(diags):
    fading = D.summarize_for_logging([diags['fading'], diags['stops_half_way']])
    steady = D.summarize_for_logging([diags['steady']], prefix='sample/')
    assert all(isinstance(v, float) for v in fading.values())
    assert fading['gen_count'] == 2.0 and fading['gen_flag_rate_fades'] == 1.0
    assert 'sample/fade_ratio_db' in steady and not any(k.startswith('gen_') for k in steady)

    message = D.fade_warning(fading, epoch=3)
    assert message is not None and 'epoch 3' in message and '2 samples' in message
    assert D.fade_warning(steady, epoch=3, prefix='sample/') is None
    assert D.fade_warning({'train_ce': 3.0}, epoch=3) is None  # no generation this epoch
    assert D.fade_warning(fading, epoch=3, threshold_db=-200.0) is None
    assert 'epoch 7' in D.fade_warning({'gen_fade_ratio_db': float('nan')}, epoch=7)
