"""Silence inside training clips: how much, where, whether it blocks training, and how to trim it.

The first users padded their 15 s clips to 30 s *on disk*; half of every file was digital silence, random crops
taught the model to fade out, and nothing complained. Masking padding frames from the loss (our default) can't help
there: the silence is in the audio itself. So a clip that is mostly silent, or that starts or ends with seconds of
silence, is an error before training (validate, prepare and the solver's check share `silence_problems`), and
`prepare --trim-silence` is the fix. Intended silence (ambient music, sparse stems) is accepted per clip with
`"allow_silence": true` in its sidecar json, which `prepare --keep-silence` writes.
"""
from dataclasses import dataclass
import math
import typing as tp

import numpy as np
import torch

SILENCE_DB = -60.0  # a window quieter than this (RMS, dBFS) counts as silence
WINDOW_S = 0.1
MOSTLY_SILENT_FRACTION = 0.5  # error above this fraction of silent windows
PARTLY_SILENT_FRACTION = 0.3  # warning above this
EDGE_SILENCE_ERROR_S = 2.0  # leading or trailing silence at least this long ...
EDGE_SILENCE_ERROR_RATIO = 0.1  # ... and at least this share of the clip is an error (a song's 2 s fade-out isn't)
EDGE_SILENCE_WARN_S = 1.0  # shorter edges from here on are a warning
TRIM_MIN_S = 0.5  # `--trim-silence` rewrites a clip whose leading or trailing silence reaches this
TRIM_KEEP_S = 0.1  # silence kept at a trimmed edge (a natural attack / release)
MIN_TRIMMED_S = 1.0  # a clip shorter than this once trimmed is dropped
ALLOW_SILENCE_KEY = 'allow_silence'  # sidecar key: this clip's silence is intended

ERROR, WARNING = 'error', 'warning'
FIX = ("Fix: `audiocraft-lora prepare SOURCE --trim-silence ...` writes trimmed copies (your originals are never "
       "modified) and leaves out clips still mostly silent or under 1 s once trimmed; if the silence is intended, "
       f"prepare with --keep-silence, put \"{ALLOW_SILENCE_KEY}\": true in the clip's sidecar json, or train with "
       f"{ALLOW_SILENCE_KEY}=true.")


@dataclass(frozen=True)
class SilenceProfile:
    """Where a decoded clip is silent (all channels together, 100 ms windows below `SILENCE_DB`).

    Attributes:
        duration (float): Clip length in seconds.
        silent_fraction (float): Share of windows that are silent.
        leading (float): Seconds of silence before the first sound.
        trailing (float): Seconds of silence after the last sound.
    """
    duration: float
    silent_fraction: float
    leading: float
    trailing: float

    @property
    def all_silent(self) -> bool:
        return self.leading >= self.duration


def silent_windows(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """One bool per 100 ms window (the last partial window included): True where the RMS is below `SILENCE_DB`.

    Args:
        wav (np.ndarray): [C, T] finite float audio.
    """
    window = max(1, int(round(sample_rate * WINDOW_S)))
    num_frames = wav.shape[-1]
    count = max(1, math.ceil(num_frames / window))
    padded = np.zeros((wav.shape[0], count * window), dtype=np.float64)
    padded[:, :num_frames] = wav
    energy = (padded ** 2).reshape(wav.shape[0], count, window).sum(axis=(0, 2))
    sizes = np.full(count, window * wav.shape[0], dtype=np.float64)
    sizes[-1] = max(1, num_frames - (count - 1) * window) * wav.shape[0]
    return energy / sizes < 10 ** (SILENCE_DB / 10)


def silence_profile(wav: tp.Union[np.ndarray, torch.Tensor], sample_rate: int) -> SilenceProfile:
    """The `SilenceProfile` of [C, T] audio (NaN/inf count as silence here; they are an error of their own)."""
    data = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    data = np.where(np.isfinite(data), data, 0.0).astype(np.float64, copy=False)
    duration = data.shape[-1] / sample_rate
    if data.shape[-1] == 0:
        return SilenceProfile(0.0, 1.0, 0.0, 0.0)
    silent = silent_windows(data, sample_rate)
    sound = np.flatnonzero(~silent)
    if sound.size == 0:
        return SilenceProfile(duration, 1.0, duration, duration)
    leading = float(sound[0] * WINDOW_S)
    trailing = float(max(0.0, duration - (sound[-1] + 1) * WINDOW_S))
    return SilenceProfile(duration, float(silent.mean()), leading, trailing)


def silence_problems(profile: SilenceProfile, allowed: bool = False) -> tp.List[tp.Tuple[str, str, str]]:
    """(severity, code, message) for the silence of one clip; errors become warnings when `allowed`.

    Codes: mostly_silent and edge_silence (errors), partly_silent and edge_silence (warnings, mild cases).
    """
    if profile.duration <= 0:
        return []
    problems = []
    blocking = WARNING if allowed else ERROR
    why = (f" Accepted (\"{ALLOW_SILENCE_KEY}\": true in its sidecar)." if allowed else f" {FIX}")
    edge, where = max((profile.leading, 'leading'), (profile.trailing, 'trailing'))
    edges = f"{profile.leading:.1f} s of leading and {profile.trailing:.1f} s of trailing silence"
    if profile.silent_fraction > MOSTLY_SILENT_FRACTION:
        problems.append((blocking, 'mostly_silent',
                         f"{profile.silent_fraction:.0%} of it ({profile.silent_fraction * profile.duration:.1f} s of "
                         f"{profile.duration:.1f} s) is silence below {SILENCE_DB:g} dBFS ({edges}): crops from it "
                         f"teach the model to fade out into silence.{why}"))
    elif edge >= EDGE_SILENCE_ERROR_S and edge >= EDGE_SILENCE_ERROR_RATIO * profile.duration:
        problems.append((blocking, 'edge_silence',
                         f"{edge:.1f} s of {where} silence in a {profile.duration:.1f} s clip ({edges}; padded on "
                         f"disk?): crops that reach it teach the model to fade out into silence.{why}"))
    elif edge >= EDGE_SILENCE_WARN_S:
        problems.append((WARNING, 'edge_silence',
                         f"{edge:.1f} s of {where} silence ({edges}). Consider `prepare --trim-silence`."))
    elif profile.silent_fraction > PARTLY_SILENT_FRACTION:
        problems.append((WARNING, 'partly_silent',
                         f"{profile.silent_fraction:.0%} of it is silence below {SILENCE_DB:g} dBFS: crops from it "
                         f"teach pauses. It is inside the clip (`--trim-silence` cuts only the edges): edit or drop "
                         f"the clip if the pauses aren't the style."))
    return problems


@dataclass(frozen=True)
class TrimPlan:
    """What `prepare --trim-silence` does with one clip: keep [start, end) seconds, or drop it (`dropped` says why)."""
    start: float
    end: float
    profile: SilenceProfile
    dropped: tp.Optional[str] = None

    @property
    def removed(self) -> float:
        return self.profile.duration - (self.end - self.start)


def plan_trim(profile: SilenceProfile) -> tp.Optional[TrimPlan]:
    """The trim of a clip, or None when it needs none (edges under `TRIM_MIN_S`, not mostly silent)."""
    if profile.all_silent:
        return TrimPlan(0.0, 0.0, profile, dropped='silent throughout')
    start = max(0.0, profile.leading - TRIM_KEEP_S) if profile.leading >= TRIM_MIN_S else 0.0
    end = profile.duration - (max(0.0, profile.trailing - TRIM_KEEP_S) if profile.trailing >= TRIM_MIN_S else 0.0)
    kept = end - start
    inner_silence = profile.silent_fraction * profile.duration - (profile.duration - kept)
    if kept > 0 and inner_silence / kept > MOSTLY_SILENT_FRACTION:
        return TrimPlan(start, end, profile, dropped=f"{inner_silence / kept:.0%} silence even once trimmed")
    if kept < MIN_TRIMMED_S:
        return TrimPlan(start, end, profile, dropped=f"only {kept:.1f} s of sound")
    if start == 0.0 and end == profile.duration:
        return None
    return TrimPlan(start, end, profile)
