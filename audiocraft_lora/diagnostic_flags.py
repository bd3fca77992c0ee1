"""Named problems of generated audio: thresholds, flags of one sample, and flags of a sample against the base's.

`sample_flags` judges one sample alone; `flags_vs_base` judges a fine-tuned model's sample against the base model's
sample for the same prompt and seed (same random stream, see `generation.py`), which catches what no absolute
threshold can: a model that got quieter, or noisier, than the model it started from.

Flags of one sample (`FLAG_NAMES`):
    fades: fade ratio (last third vs first third, ungated RMS) below -10 dB.
    mostly_silent: more than half of the loudness windows below the silence threshold (-60 dBFS).
    noise_like: librosa spectral flatness above 0.3 (white noise), or detrended flatness above 0.25 (broadband noise
        of any colour: pink, brown, or music buried in noise). Detrended flatness removes each frame's power-law
        tilt before measuring flatness (see `diagnostics.detrended_flatness`): pink noise reads ~0.14 on librosa's
        flatness, like some drum loops, but ~0.56 once detrended, where music stays low. Validated on synthetic
        15 s, 32 kHz signals (tests/diagnostics/music_signals.py): trap-like loops (kick, snare, 8th-32nd hats, 808,
        melody, lofi crackle at -40 dB) read <= 0.09; pink, brown and white noise ~0.56; a loop plus white noise at
        -6 dB SNR ~0.29, plus pink noise at -12 dB ~0.30. 0.25 sits between with margin on both sides.
    clipping: more than 1% of the samples at full scale.
    silent_tail: the sample ends in at least 2 s of silence, or in silence for at least 15% of its duration
        (10 ms resolution). 2 s is audible as "the music stopped" at any length; 15% catches shorter samples
        (0.75 s of a 5 s sample). A 15 s loop whose last 4 s are silent fades by only ~-7.6 dB (above the -10 dB
        fade threshold), so the fade flag alone misses it.

Flags against the base (`PAIR_FLAG_NAMES`), same prompt and seed:
    quieter_than_base: integrated loudness at least 6 LU below the base's sample. 6 LU is clearly audible
        (-10 LU reads as "half as loud") while allowing the style to change the mix somewhat.
    noisier_than_base: detrended flatness at least 0.12 above the base's sample. Synthetic loops of different
        styles differ by <= 0.09 from each other; the same loop plus white noise at -12 dB SNR is +0.15 above it.
"""
import dataclasses
import typing as tp

FADE_FLAG_DB = -10.0  # 'fades': last third is more than 10 dB quieter than the first third.
MOSTLY_SILENT_FRACTION = 0.5  # 'mostly_silent': more than half of the windows are silent.
NOISE_FLATNESS = 0.3  # 'noise_like': mean spectral flatness above 0.3 (white noise ~0.56, music ~0.01-0.2).
NOISE_DETRENDED_FLATNESS = 0.25  # 'noise_like' too: detrended flatness above 0.25 (any broadband noise ~0.56).
CLIPPING_FRACTION = 0.01  # 'clipping': more than 1% of the samples at full scale.
TAIL_SILENCE_S = 2.0  # 'silent_tail': at least 2 s of trailing silence ...
TAIL_SILENCE_FRACTION = 0.15  # ... or trailing silence over at least 15% of the duration.
QUIETER_THAN_BASE_LU = 6.0  # 'quieter_than_base': integrated LUFS at least 6 LU below the base's sample.
NOISIER_THAN_BASE_FLATNESS = 0.12  # 'noisier_than_base': detrended flatness at least 0.12 above the base's.

FLAG_NAMES = ('fades', 'mostly_silent', 'noise_like', 'clipping', 'silent_tail')
PAIR_FLAG_NAMES = ('quieter_than_base', 'noisier_than_base')


@dataclasses.dataclass
class FlagThresholds:
    """Thresholds of `sample_flags` and `flags_vs_base`; the defaults are the module constants."""
    fade_db: float = FADE_FLAG_DB
    mostly_silent_fraction: float = MOSTLY_SILENT_FRACTION
    noise_flatness: float = NOISE_FLATNESS
    clipping_fraction: float = CLIPPING_FRACTION
    noise_detrended_flatness: float = NOISE_DETRENDED_FLATNESS
    tail_silence_s: float = TAIL_SILENCE_S
    tail_silence_fraction: float = TAIL_SILENCE_FRACTION
    quieter_than_base_lu: float = QUIETER_THAN_BASE_LU
    noisier_than_base_flatness: float = NOISIER_THAN_BASE_FLATNESS


def sample_flags(values: tp.Mapping[str, tp.Any], limits: tp.Optional[FlagThresholds] = None) -> tp.List[str]:
    """Flags of one sample (see the module docstring), in `FLAG_NAMES` order.

    Args:
        values (dict): `AudioDiagnostics.to_dict()` of the sample.
        limits (FlagThresholds, optional): defaults to the module constants.
    """
    limits = limits or FlagThresholds()
    tail_s, duration_s = float(values['tail_silence_s']), float(values['duration_s'])
    raised = {
        'fades': values['fade_ratio_db'] < limits.fade_db,
        'mostly_silent': values['silence_fraction'] > limits.mostly_silent_fraction,
        'noise_like': (values['spectral_flatness'] > limits.noise_flatness
                       or values['detrended_flatness'] > limits.noise_detrended_flatness),
        'clipping': values['clipping_fraction'] > limits.clipping_fraction,
        'silent_tail': tail_s > 0 and (tail_s >= limits.tail_silence_s
                                       or tail_s >= limits.tail_silence_fraction * duration_s),
    }
    return [name for name in FLAG_NAMES if raised[name]]


def flags_vs_base(values: tp.Mapping[str, tp.Any], base_values: tp.Mapping[str, tp.Any],
                  limits: tp.Optional[FlagThresholds] = None) -> tp.List[str]:
    """Flags of a sample against the base model's sample for the same prompt and seed, in `PAIR_FLAG_NAMES` order.

    Args:
        values (dict): `AudioDiagnostics.to_dict()` of the fine-tuned model's sample.
        base_values (dict): the same for the base model's sample.
        limits (FlagThresholds, optional): defaults to the module constants.
    """
    limits = limits or FlagThresholds()
    loudness_diff = float(values['integrated_lufs']) - float(base_values['integrated_lufs'])
    flatness_diff = float(values['detrended_flatness']) - float(base_values['detrended_flatness'])
    raised = {
        'quieter_than_base': loudness_diff <= -limits.quieter_than_base_lu,
        'noisier_than_base': flatness_diff >= limits.noisier_than_base_flatness,
    }
    return [name for name in PAIR_FLAG_NAMES if raised[name]]
