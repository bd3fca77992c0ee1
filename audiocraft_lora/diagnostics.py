"""Objective diagnostics of generated audio: loudness over time, fading, silence, noise-likeness, clipping.

A fine-tune judged only by ear can fade to silence or turn into noise without anyone noticing. Every number here
is computed on one waveform (`audio_diagnostics`), then averaged over samples (`aggregate`, `summarize_for_logging`)
and compared with the base model (`compare_to_base`). `flags` turns the numbers into named problems.

Conventions:
    - Input audio is float, full scale = 1.0 (what MusicGen's decoder returns), shaped [T] or [C, T].
    - All dB values are floored at `DB_FLOOR` (-100 dB), so silence gives finite numbers, never -inf or NaN.
    - "RMS dBFS" is 10 * log10(mean square) over all channels, so a stereo file with two identical channels gives
      the same RMS as its mono version. LUFS follows ITU-R BS.1770 (pyloudnorm): channel powers are *summed*,
      so dual-mono stereo reads +3.01 LU louder than the mono file.
    - Loudness curve: one value per non-overlapping window of `window_s` seconds. When `window_s` >= 0.4 s
      (the BS.1770 gating block pyloudnorm needs) the curve is K-weighted loudness in LUFS (ungated, the
      momentary loudness of each window); below that it is RMS dBFS. `AudioDiagnostics.loudness_unit` says which.
      A trailing partial window is left out of the curves (tail silence is measured at 10 ms resolution).
    - `fade_ratio_db` uses *ungated* RMS of the last third minus the first third of the samples: BS.1770 gating
      would drop the quiet blocks and hide exactly the fade we are looking for.
    - `spectral_flatness` is librosa's (power spectrum, n_fft 2048, hop 512), averaged over frames that are above
      the silence threshold only (a silent frame has flatness 1.0 and would look like noise). White noise gives
      ~0.56, a pure tone ~0, music typically 0.01-0.2. No audible frame at all gives 0.0. Pink noise reads only
      ~0.14 there, so `detrended_flatness` measures it again after removing each frame's power-law tilt: noise of
      any colour ~0.56, music low.
    - Flags and their thresholds live in `diagnostic_flags` (re-exported here).
"""
import dataclasses
import math
import typing as tp

import librosa
import numpy as np
import pyloudnorm

from . import diagnostic_flags
from .errors import UserError

# Flags and their thresholds (defined in `diagnostic_flags`; kept here, where they have always been importable).
FlagThresholds = diagnostic_flags.FlagThresholds
FLAG_NAMES = diagnostic_flags.FLAG_NAMES
PAIR_FLAG_NAMES = diagnostic_flags.PAIR_FLAG_NAMES
FADE_FLAG_DB = diagnostic_flags.FADE_FLAG_DB
MOSTLY_SILENT_FRACTION = diagnostic_flags.MOSTLY_SILENT_FRACTION
NOISE_FLATNESS = diagnostic_flags.NOISE_FLATNESS
NOISE_DETRENDED_FLATNESS = diagnostic_flags.NOISE_DETRENDED_FLATNESS
CLIPPING_FRACTION = diagnostic_flags.CLIPPING_FRACTION

# Every dB value (LUFS, dBFS, fade ratio terms) is floored here so that silence stays finite.
DB_FLOOR = -100.0
# A window (or 10 ms frame for the tail) whose RMS is below this is silent.
SILENCE_THRESHOLD_DBFS = -60.0
# A sample with |x| >= this counts as clipped (float audio, full scale 1.0).
CLIP_THRESHOLD = 0.999
# pyloudnorm (ITU-R BS.1770) measures blocks of at least 400 ms; shorter windows fall back to RMS dBFS.
LUFS_MIN_WINDOW_S = 0.4
# Resolution of the trailing-silence measurement.
TAIL_FRAME_S = 0.01
# STFT settings of the flatness measurement (librosa defaults).
FLATNESS_N_FFT = 2048
FLATNESS_HOP = 512
# pyloudnorm's channel gains cover at most 5 channels (L, R, C, Ls, Rs).
MAX_CHANNELS = 5

# Detrended flatness: the power-law tilt of each frame is fitted between these frequencies.
DETREND_MIN_HZ = 50.0
DETREND_MAX_NYQUIST_FRACTION = 0.9

# Scalar metrics of one sample, in display order; `aggregate` and `compare_to_base` work on these.
SCALAR_METRICS = ('integrated_lufs', 'fade_ratio_db', 'silence_fraction', 'spectral_flatness', 'detrended_flatness',
                  'clipping_fraction', 'tail_silence_s', 'peak_dbfs', 'duration_s')

AnyWav = tp.Union[np.ndarray, 'torch.Tensor']  # noqa: F821
DiagLike = tp.Union['AudioDiagnostics', tp.Mapping[str, tp.Any]]


@dataclasses.dataclass
class AudioDiagnostics:
    """Diagnostics of one waveform. Curves are plain lists so that `to_dict()` is json-serialisable.

    Attributes:
        sample_rate (int): Hz.
        num_channels (int): C of the input.
        duration_s (float): T / sample_rate.
        window_s (float): length of the loudness windows.
        loudness_unit (str): 'LUFS' (window_s >= 0.4 s) or 'dBFS' (RMS fallback for shorter windows).
        window_times_s (list of float): [W] centre of each full window, seconds.
        loudness_curve (list of float): [W] loudness per window in `loudness_unit`.
        rms_curve_dbfs (list of float): [W] RMS per window, dBFS.
        integrated_lufs (float): BS.1770 gated integrated loudness, LUFS (floored at DB_FLOOR).
        fade_ratio_db (float): ungated RMS dB of the last third minus the first third.
        silence_fraction (float): fraction of windows with RMS below `silence_threshold_dbfs`.
        spectral_flatness (float): mean librosa flatness over audible frames (0 = tonal, ~0.56 = white noise).
        detrended_flatness (float): the same after removing each frame's power-law tilt (~0.56 = noise of any
            colour: white, pink, brown; music stays low), see `detrended_flatness`.
        clipping_fraction (float): fraction of samples (all channels) with |x| >= `clip_threshold`.
        tail_silence_s (float): seconds of trailing silence (10 ms resolution).
        peak_dbfs (float): sample peak, dBFS.
        silence_threshold_dbfs (float): setting used.
        clip_threshold (float): setting used.
    """
    sample_rate: int
    num_channels: int
    duration_s: float
    window_s: float
    loudness_unit: str
    window_times_s: tp.List[float]
    loudness_curve: tp.List[float]
    rms_curve_dbfs: tp.List[float]
    integrated_lufs: float
    fade_ratio_db: float
    silence_fraction: float
    spectral_flatness: float
    detrended_flatness: float
    clipping_fraction: float
    tail_silence_s: float
    peak_dbfs: float
    silence_threshold_dbfs: float
    clip_threshold: float

    def to_dict(self) -> tp.Dict[str, tp.Any]:
        """All fields as a json-serialisable dict."""
        return dataclasses.asdict(self)

    def scalars(self) -> tp.Dict[str, float]:
        """The `SCALAR_METRICS` of this sample."""
        return {name: float(getattr(self, name)) for name in SCALAR_METRICS}


def _to_db(power: tp.Union[float, np.ndarray]) -> tp.Union[float, np.ndarray]:
    """10 * log10(power), floored at DB_FLOOR."""
    floor = 10.0 ** (DB_FLOOR / 10.0)
    return 10.0 * np.log10(np.maximum(power, floor))


def as_channels_first(wav: AnyWav) -> np.ndarray:
    """Validate audio and return it as float64 numpy.

    Args:
        wav (np.ndarray or torch.Tensor): [T] or [C, T], float, full scale 1.0.
    Returns:
        np.ndarray: [C, T] float64.
    Raises:
        UserError: wrong type, dtype or shape, empty, or non-finite samples.
    """
    if hasattr(wav, 'detach') and hasattr(wav, 'cpu'):  # torch.Tensor, without importing torch here
        wav = wav.detach().cpu()
        if not wav.is_floating_point():
            raise UserError(f'audio tensor has dtype {wav.dtype}; pass float audio with full scale 1.0.')
        wav = wav.double().numpy()
    if not isinstance(wav, np.ndarray):
        raise UserError(f'audio must be a numpy array or torch tensor, got {type(wav).__name__}.')
    if not np.issubdtype(wav.dtype, np.floating):
        raise UserError(f'audio array has dtype {wav.dtype}; convert to float with full scale 1.0 '
                        '(e.g. int16 / 32768).')
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2:
        raise UserError(f'audio must be shaped [T] or [C, T], got shape {tuple(wav.shape)}; '
                        'pass one sample at a time (e.g. wav[i] of a [B, C, T] batch).')
    channels, length = wav.shape
    if length == 0:
        raise UserError('audio is empty (0 samples).')
    if channels > MAX_CHANNELS:
        raise UserError(f'audio has {channels} channels (shape {tuple(wav.shape)}); expected [C, T] with C <= '
                        f'{MAX_CHANNELS}. Was it passed as [T, C]? Transpose it.')
    if not np.all(np.isfinite(wav)):
        raise UserError(f'audio contains {int(np.sum(~np.isfinite(wav)))} NaN/inf samples.')
    return wav.astype(np.float64, copy=False)


def audio_diagnostics(wav: AnyWav, sample_rate: int, window_s: float = 0.5,
                      silence_threshold_dbfs: float = SILENCE_THRESHOLD_DBFS,
                      clip_threshold: float = CLIP_THRESHOLD) -> AudioDiagnostics:
    """Compute every diagnostic of one waveform (see the module docstring for definitions).

    Args:
        wav (np.ndarray or torch.Tensor): [T] or [C, T], float, full scale 1.0.
        sample_rate (int): Hz.
        window_s (float): loudness / silence window, seconds. >= 0.4 s gives a LUFS curve, else RMS dBFS.
        silence_threshold_dbfs (float): RMS below this is silence.
        clip_threshold (float): |x| at or above this is clipped.
    Returns:
        AudioDiagnostics
    Raises:
        UserError: bad audio, or audio shorter than max(window_s, 0.4 s).
    """
    audio = as_channels_first(wav)
    if not (isinstance(sample_rate, (int, np.integer)) and sample_rate > 0):
        raise UserError(f'sample_rate must be a positive integer, got {sample_rate!r}.')
    sample_rate = int(sample_rate)
    if not window_s > 0:
        raise UserError(f'window_s must be > 0, got {window_s!r}.')
    channels, length = audio.shape
    duration_s = length / sample_rate
    min_duration_s = max(window_s, LUFS_MIN_WINDOW_S)
    if duration_s < min_duration_s:
        raise UserError(f'audio is {duration_s:.3f} s long; diagnostics need at least {min_duration_s:.3f} s '
                        f'(window_s={window_s}, BS.1770 block {LUFS_MIN_WINDOW_S} s).')

    power = np.mean(audio ** 2, axis=0)  # [T], mean over channels
    window_len = int(round(window_s * sample_rate))
    num_windows = length // window_len
    window_power = power[:num_windows * window_len].reshape(num_windows, window_len).mean(axis=1)
    rms_curve = _to_db(window_power)
    window_times = (np.arange(num_windows) + 0.5) * window_len / sample_rate

    samples_last = audio.T  # pyloudnorm wants [T, C]
    if window_s >= LUFS_MIN_WINDOW_S:
        loudness_unit = 'LUFS'
        loudness_curve = _windowed_lufs(samples_last, sample_rate, window_len / sample_rate, num_windows)
    else:
        loudness_unit = 'dBFS'
        loudness_curve = rms_curve
    integrated = float(pyloudnorm.Meter(sample_rate).integrated_loudness(samples_last))
    integrated = max(integrated, DB_FLOOR) if not math.isnan(integrated) else DB_FLOOR

    third = length // 3
    fade_ratio_db = float(_to_db(power[length - third:].mean()) - _to_db(power[:third].mean()))
    silence_fraction = float(np.mean(rms_curve < silence_threshold_dbfs))
    peak_dbfs = float(20.0 * np.log10(max(np.max(np.abs(audio)), 10.0 ** (DB_FLOOR / 20.0))))
    flatness, detrended = _audible_flatness(audio, sample_rate, silence_threshold_dbfs)

    return AudioDiagnostics(
        sample_rate=sample_rate, num_channels=channels, duration_s=duration_s, window_s=float(window_s),
        loudness_unit=loudness_unit, window_times_s=window_times.tolist(),
        loudness_curve=[float(v) for v in loudness_curve], rms_curve_dbfs=[float(v) for v in rms_curve],
        integrated_lufs=integrated, fade_ratio_db=fade_ratio_db, silence_fraction=silence_fraction,
        spectral_flatness=flatness, detrended_flatness=detrended,
        clipping_fraction=float(np.mean(np.abs(audio) >= clip_threshold)),
        tail_silence_s=_tail_silence_s(power, sample_rate, silence_threshold_dbfs), peak_dbfs=peak_dbfs,
        silence_threshold_dbfs=float(silence_threshold_dbfs), clip_threshold=float(clip_threshold))


def sample_diagnostics(wavs: AnyWav, sample_rate: int, window_s: float = 0.5) -> tp.List[AudioDiagnostics]:
    """Diagnostics of each item of a batch [B, C, T] (as generated during training).

    Items too short for the loudness window, or holding NaN/inf, are left out (with a log line), so that the
    measurement never stops a training run.
    """
    import logging
    results = []
    for index, wav in enumerate(wavs):
        if hasattr(wav, 'detach'):
            wav = wav.detach().float().cpu().numpy()
        try:
            results.append(audio_diagnostics(wav, sample_rate, window_s=window_s))
        except UserError as exc:
            logging.getLogger(__name__).warning("Sample %d not measured: %s", index, exc)
    return results


def _windowed_lufs(samples_last: np.ndarray, sample_rate: int, window_s: float, num_windows: int) -> np.ndarray:
    """Ungated K-weighted loudness of consecutive windows, LUFS.

    The whole signal is K-weighted once by pyloudnorm (no filter restart per window); with a block of `window_s`
    and no overlap, pyloudnorm's `blockwise_loudness` is exactly the loudness of each window.

    Args:
        samples_last (np.ndarray): [T, C].
    Returns:
        np.ndarray: [num_windows] LUFS, floored at DB_FLOOR.
    """
    meter = pyloudnorm.Meter(sample_rate, block_size=window_s, overlap=0.0)
    meter.integrated_loudness(samples_last)
    blocks = np.asarray(meter.blockwise_loudness, dtype=np.float64)
    if blocks.shape[0] < num_windows:  # guards against a change of pyloudnorm's internals
        raise RuntimeError(f'pyloudnorm returned {blocks.shape[0]} blocks, expected >= {num_windows}.')
    blocks = blocks[:num_windows]
    return np.where(np.isfinite(blocks), np.maximum(blocks, DB_FLOOR), DB_FLOOR)


def _audible_flatness(audio: np.ndarray, sample_rate: int, silence_threshold_dbfs: float) -> tp.Tuple[float, float]:
    """Mean librosa spectral flatness and mean detrended flatness over frames above the silence threshold, all
    channels. (0.0, 0.0) if no frame is audible.

    Args:
        audio (np.ndarray): [C, T].
    """
    length = audio.shape[1]
    n_fft = min(FLATNESS_N_FFT, 2 ** int(math.floor(math.log2(length))))
    hop = min(FLATNESS_HOP, n_fft // 4)
    plain, detrended = [], []
    for channel in audio:
        flatness = librosa.feature.spectral_flatness(y=channel, n_fft=n_fft, hop_length=hop)[0]
        power = np.abs(librosa.stft(channel, n_fft=n_fft, hop_length=hop)) ** 2
        untilted = detrended_flatness(power, librosa.fft_frequencies(sr=sample_rate, n_fft=n_fft))
        rms = librosa.feature.rms(y=channel, frame_length=n_fft, hop_length=hop, dtype=np.float64)[0]
        frames = min(flatness.shape[0], untilted.shape[0], rms.shape[0])
        audible = 20.0 * np.log10(np.maximum(rms[:frames], 1e-12)) >= silence_threshold_dbfs
        plain.append(flatness[:frames][audible])
        detrended.append(untilted[:frames][audible])
    plain_values, detrended_values = np.concatenate(plain), np.concatenate(detrended)
    if not plain_values.size:
        return 0.0, 0.0
    return float(plain_values.mean()), float(detrended_values.mean())


def detrended_flatness(power: np.ndarray, frequencies: np.ndarray, amin: float = 1e-10) -> np.ndarray:
    """Spectral flatness of each frame after removing its power-law tilt.

    A straight line is fitted (least squares) to log power against log frequency between `DETREND_MIN_HZ` and
    `DETREND_MAX_NYQUIST_FRACTION` of Nyquist; flatness (geometric / arithmetic mean) is measured on the power
    divided by that line. Noise whose spectrum is a power law (white, pink, brown) reads ~0.56 (e^-gamma, the ratio
    for exponentially distributed periodogram bins) whatever its colour; tonal and percussive music stays low
    because its spectrum is not a straight line in log-log. Band-limited noise (nothing above some frequency) is
    not detected by this measure.

    Args:
        power (np.ndarray): [F, N] power spectrogram (|STFT|^2).
        frequencies (np.ndarray): [F] bin frequencies, Hz.
        amin (float): power floor before the log (librosa's flatness uses the same).
    Returns:
        np.ndarray: [N] flatness in [0, 1].
    """
    band = (frequencies >= DETREND_MIN_HZ) & (frequencies <= DETREND_MAX_NYQUIST_FRACTION * frequencies[-1])
    if band.sum() < 3:
        raise UserError(f'detrended_flatness: only {int(band.sum())} bins between {DETREND_MIN_HZ} Hz and '
                        f'{DETREND_MAX_NYQUIST_FRACTION} x Nyquist; use a longer FFT or a higher sample rate.')
    log_power = np.log(np.maximum(power[band].astype(np.float64), amin))  # [F', N]
    design = np.stack([np.log(frequencies[band]), np.ones(int(band.sum()))], axis=1)  # [F', 2]
    coefficients, *_ = np.linalg.lstsq(design, log_power, rcond=None)  # [2, N]
    residual = log_power - design @ coefficients
    residual -= residual.max(axis=0, keepdims=True)  # flatness is scale-free; keeps exp() finite
    ratio = np.exp(residual)
    return np.exp(np.mean(residual, axis=0)) / np.maximum(np.mean(ratio, axis=0), 1e-300)


def _tail_silence_s(power: np.ndarray, sample_rate: int, silence_threshold_dbfs: float) -> float:
    """Seconds after the last 10 ms frame whose RMS is at or above the silence threshold.

    Args:
        power (np.ndarray): [T] squared samples, averaged over channels.
    """
    length = power.shape[0]
    frame_len = max(1, int(round(TAIL_FRAME_S * sample_rate)))
    starts = np.arange(0, length, frame_len)
    counts = np.diff(np.append(starts, length))
    frame_db = _to_db(np.add.reduceat(power, starts) / counts)
    audible = np.nonzero(frame_db >= silence_threshold_dbfs)[0]
    if audible.size == 0:
        return length / sample_rate
    last = audible[-1]
    return float(length - (starts[last] + counts[last])) / sample_rate


def _as_dict(diag: DiagLike) -> tp.Mapping[str, tp.Any]:
    if isinstance(diag, AudioDiagnostics):
        return diag.to_dict()
    if isinstance(diag, tp.Mapping):
        missing = [name for name in SCALAR_METRICS if name not in diag]
        if missing:
            raise UserError(f'diagnostics dict lacks {missing}; build it with audio_diagnostics(...).to_dict().')
        return diag
    raise UserError(f'expected AudioDiagnostics or its to_dict(), got {type(diag).__name__}.')


def flags(diag: DiagLike, thresholds: tp.Optional[FlagThresholds] = None) -> tp.List[str]:
    """Named problems of one sample, in `FLAG_NAMES` order (definitions: `audiocraft_lora.diagnostic_flags`).

    Args:
        diag (AudioDiagnostics or dict): one sample's diagnostics.
        thresholds (FlagThresholds, optional): defaults to the module constants.
    """
    return diagnostic_flags.sample_flags(_as_dict(diag), thresholds)


def flags_vs_base(diag: DiagLike, base_diag: DiagLike,
                  thresholds: tp.Optional[FlagThresholds] = None) -> tp.List[str]:
    """Named problems of a sample against the base model's sample for the same prompt and seed, in
    `PAIR_FLAG_NAMES` order ('quieter_than_base', 'noisier_than_base'; see `audiocraft_lora.diagnostic_flags`)."""
    return diagnostic_flags.flags_vs_base(_as_dict(diag), _as_dict(base_diag), thresholds)


def aggregate(diags: tp.Sequence[DiagLike], thresholds: tp.Optional[FlagThresholds] = None) -> tp.Dict[str, tp.Any]:
    """Mean and median of every scalar metric over samples, plus how often each flag is raised.

    Args:
        diags (list of AudioDiagnostics or dicts): one model's samples.
    Returns:
        dict: {'count': N, 'metrics': {metric: {'mean': float, 'median': float}},
        'flag_rates': {flag: fraction of samples raising it}}.
    """
    if not diags:
        raise UserError('aggregate() needs at least one sample; none were given.')
    rows = [_as_dict(diag) for diag in diags]
    metrics = {}
    for name in SCALAR_METRICS:
        column = np.array([float(row[name]) for row in rows])
        metrics[name] = {'mean': float(column.mean()), 'median': float(np.median(column))}
    raised = [flags(row, thresholds) for row in rows]
    rates = {name: float(np.mean([name in sample_flags for sample_flags in raised])) for name in FLAG_NAMES}
    return {'count': len(rows), 'metrics': metrics, 'flag_rates': rates}


def compare_to_base(base_agg: tp.Mapping[str, tp.Any], other_agg: tp.Mapping[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Differences of one model's aggregate to the base model's (other - base, on means).

    Args:
        base_agg (dict): `aggregate` of the base model.
        other_agg (dict): `aggregate` of the compared model.
    Returns:
        dict: {'metrics': {metric: {'base': float, 'other': float, 'diff': float}},
        'flag_rates': {flag: {'base': float, 'other': float, 'diff': float}}}.
    """
    for name, agg in (('base_agg', base_agg), ('other_agg', other_agg)):
        if 'metrics' not in agg or 'flag_rates' not in agg:
            raise UserError(f'{name} is not an aggregate() result (needs "metrics" and "flag_rates").')

    def _diff(base: float, other: float) -> tp.Dict[str, float]:
        return {'base': float(base), 'other': float(other), 'diff': float(other) - float(base)}

    return {
        'metrics': {name: _diff(base_agg['metrics'][name]['mean'], other_agg['metrics'][name]['mean'])
                    for name in SCALAR_METRICS},
        'flag_rates': {name: _diff(base_agg['flag_rates'][name], other_agg['flag_rates'][name])
                       for name in FLAG_NAMES},
    }


def summarize_for_logging(diags: tp.Sequence[DiagLike], prefix: str = 'gen_',
                          thresholds: tp.Optional[FlagThresholds] = None) -> tp.Dict[str, float]:
    """Flat dict of means for tensorboard / wandb during training.

    Returns:
        dict: {f'{prefix}{metric}': mean for each scalar metric} plus {f'{prefix}flag_rate_{flag}': fraction}
        and {f'{prefix}count': N}.
    """
    agg = aggregate(diags, thresholds)
    summary = {f'{prefix}{name}': stats['mean'] for name, stats in agg['metrics'].items()}
    summary.update({f'{prefix}flag_rate_{name}': rate for name, rate in agg['flag_rates'].items()})
    summary[f'{prefix}count'] = float(agg['count'])
    return summary


def fade_warning(metrics: tp.Mapping[str, float], epoch: int, threshold_db: float = FADE_FLAG_DB,
                 prefix: str = 'gen_') -> tp.Optional[str]:
    """A warning naming the epoch when generated samples fade (mean fade ratio below `threshold_db`).

    Args:
        metrics (dict): an epoch's metrics holding `summarize_for_logging` output (keys with `prefix`).
        epoch (int): epoch the samples were generated at (named in the message).
        threshold_db (float): warn when the mean `fade_ratio_db` is below this.
        prefix (str): prefix given to `summarize_for_logging`.
    Returns:
        str or None: None when the samples don't fade, or when this epoch generated no samples (key absent).
    """
    key = f'{prefix}fade_ratio_db'
    if key not in metrics:
        return None
    fade_db = float(metrics[key])
    if math.isfinite(fade_db) and fade_db >= threshold_db:
        return None
    count = metrics.get(f'{prefix}count')
    over = f' over {int(count)} samples' if count is not None else ''
    silent = metrics.get(f'{prefix}silence_fraction')
    silence = f', {100 * float(silent):.0f}% of windows silent' if silent is not None else ''
    return (f'epoch {epoch}: generated samples fade: the last third is {fade_db:.1f} dB relative to the first '
            f'third (mean{over}{silence}; threshold {threshold_db:.1f} dB). The model may be learning to fade '
            'into silence: check that padded positions are masked out of the loss and that train/generate '
            'durations match the clips.')
