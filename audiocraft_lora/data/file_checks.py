"""Checks of one audio file and its sidecar, independent of which manifest lists it.

Every failure becomes a (severity, code, message) problem; nothing here raises.
"""
from dataclasses import dataclass, field
import math
import os
from pathlib import Path
import typing as tp

from .audio_files import (AudioHeader, AudioReadError, audio_stats, declared_wav_frames, file_digest, probe_audio,
                          read_audio)
from .sidecars import sidecar_allows_silence, sidecar_problems
from .silence import silence_problems, silence_profile

ERROR, WARNING = 'error', 'warning'
SILENT_PEAK = 1e-3  # -60 dBFS: a clip whose loudest sample is below this is silence for training purposes
QUIET_RMS_DB = -40.0
CLIPPED_FRACTION = 1e-3
TRUNCATION_TOLERANCE = 0.02  # decoded/declared length ratio below 1 - this means the file is cut short


@dataclass(frozen=True)
class Expectations:
    """What training will ask of each file (see `validate_datasource` for the meaning of each field)."""
    sample_rate: int = 32000
    channels: int = 1
    segment_duration: tp.Optional[float] = 30.0
    min_segment_ratio: float = 0.5
    decode: bool = True
    info_fields_required: bool = True
    allow_missing_description: bool = False
    allow_silence: bool = False  # accept long/mostly silence in every clip (else per clip, from its sidecar)


@dataclass
class FileCheck:
    """Result of checking one file.

    Attributes:
        path (str): The path AudioCraft opens (absolute, symlinks kept).
        problems (list): (severity, code, message) triples.
        usable (bool): False when the file can't be read at all (entry-level checks are then skipped).
        header (AudioHeader, optional): Header values when readable.
        duration (float, optional): Actual length in seconds (decoded length when decoded).
        realpath (str): Symlink-resolved path, to find the same file in two splits.
        digest (str, optional): Content hash (only when decoding), to find copies under other names.
        truncated (bool): The file is shorter than its header declares.
    """
    path: str
    problems: tp.List[tp.Tuple[str, str, str]] = field(default_factory=list)
    usable: bool = True
    header: tp.Optional[AudioHeader] = None
    duration: tp.Optional[float] = None
    realpath: str = ''
    digest: tp.Optional[str] = None
    truncated: bool = False

    def add(self, severity: str, code: str, message: str) -> None:
        self.problems.append((severity, code, message))


def check_audio_file(path: Path, expect: Expectations) -> FileCheck:
    """Check one file: existence, permissions, header, format vs target, decoded content, then its sidecar."""
    result = FileCheck(str(path), realpath=os.path.realpath(path))
    try:
        if not _check_access(path, result):
            return result  # its sidecar matters once the audio itself is there
        _check_header(path, expect, result)
        if result.usable and expect.decode:
            _check_content(path, result, expect.allow_silence or sidecar_allows_silence(path))
        for code, message in sidecar_problems(path, expect.info_fields_required, expect.allow_missing_description):
            result.add(ERROR, code, message)
    except Exception as exc:  # noqa: BLE001 - a checker bug must still name the file, never give a traceback.
        result.usable = False
        result.add(ERROR, 'check_failed', f"unexpected {type(exc).__name__} while checking this file ({exc}). "
                                          f"Fix: re-export the file; report this if it persists.")
    return result


def _check_access(path: Path, result: FileCheck) -> bool:
    result.usable = False
    try:
        status = os.stat(path)
    except FileNotFoundError:
        target = f" (a dangling symlink to {os.readlink(path)})" if os.path.islink(path) else ''
        result.add(ERROR, 'missing_file', f"file not found{target}. Relative manifest paths are resolved against the "
                                          f"folder `dora run` is launched from. Fix: restore the file, or re-run "
                                          f"`audiocraft-lora prepare` to rewrite the manifest.")
        return False
    except PermissionError:
        result.add(ERROR, 'unreadable', "permission denied on a parent folder. Fix: make the folders traversable "
                                        "(chmod a+x) by the training user.")
        return False
    if os.path.isdir(path):
        result.add(ERROR, 'is_directory', "this path is a directory, not an audio file. Fix: list the audio files "
                                          "themselves in the manifest (re-run `audiocraft-lora prepare`).")
        return False
    if status.st_size == 0:
        result.add(ERROR, 'zero_length', "the file is empty (0 bytes). Fix: re-copy or re-export it, or remove its "
                                         "manifest line.")
        return False
    try:
        with open(path, 'rb') as handle:
            handle.read(1)
    except PermissionError:
        result.add(ERROR, 'unreadable', "permission denied when opening the file. Fix: `chmod a+r` it for the "
                                        "training user.")
        return False
    except OSError as exc:
        result.add(ERROR, 'unreadable', f"the file can't be opened ({exc}). Fix: re-copy it.")
        return False
    result.usable = True
    return True


def _check_header(path: Path, expect: Expectations, result: FileCheck) -> None:
    try:
        header = probe_audio(path)
    except AudioReadError as exc:
        result.usable = False
        result.add(ERROR, 'corrupt_audio', f"{exc}. Fix: re-export it as wav/flac (or check the extension matches "
                                           f"the format), or remove its manifest line.")
        return
    result.header, result.duration = header, header.duration
    if header.num_frames <= 0:
        result.usable = False
        result.add(ERROR, 'zero_length', "the file holds no audio (0 frames). Fix: re-export it, or remove it.")
        return
    declared = declared_wav_frames(path)
    if declared is not None and declared > header.num_frames * (1 + TRUNCATION_TOLERANCE):
        _flag_truncated(result, declared / header.sample_rate, header.duration)
    if header.channels != expect.channels:
        if expect.channels > header.channels > 1:
            result.add(ERROR, 'channel_mismatch', f"{header.channels} channels can't become {expect.channels}: "
                                                  f"AudioCraft's convert_audio raises on it. Fix: re-export as mono "
                                                  f"or {expect.channels} channels.")
        else:
            if expect.channels == 1:
                how = 'averaged down to 1'
            elif header.channels == 1:
                how = f'duplicated up to {expect.channels}'
            else:
                how = f'cut to its first {expect.channels}'
            result.add(WARNING, 'channel_mismatch', f"{header.channels} channel(s), {how} by the dataset at every "
                                                    f"step{CONVERT_ONCE}.")
    if header.sample_rate != expect.sample_rate:
        lowpass = (f"; it has no content above {header.sample_rate / 2000:g} kHz, so the model learns muffled audio"
                   if header.sample_rate < expect.sample_rate else '')
        result.add(WARNING, 'sample_rate_mismatch', f"{header.sample_rate} Hz, resampled to {expect.sample_rate} Hz "
                                                    f"by the dataset at every step (~5x a loader worker's time of a "
                                                    f"file already at {expect.sample_rate} Hz: the loader can hold "
                                                    f"a fast GPU step back){CONVERT_ONCE}{lowpass}.")


CONVERT_ONCE = " (`audiocraft-lora prepare ... --convert` converts such files once instead)"


def _check_content(path: Path, result: FileCheck, allow_silence: bool = False) -> None:
    try:
        wav, sample_rate = read_audio(path)
    except AudioReadError as exc:
        result.usable = False
        result.add(ERROR, 'corrupt_audio', f"the header reads but the audio doesn't: {exc}. Fix: re-export it as "
                                           f"wav/flac, or remove its manifest line.")
        return
    stats = audio_stats(wav, sample_rate)
    decoded = stats.num_frames / sample_rate
    if result.duration and not result.truncated and decoded < result.duration * (1 - TRUNCATION_TOLERANCE) \
            and result.duration - decoded > 0.1:
        _flag_truncated(result, result.duration, decoded)
    result.duration = decoded
    result.digest = file_digest(path)
    if stats.num_frames == 0:
        result.usable = False
        result.add(ERROR, 'zero_length', "decoding yields no audio. Fix: re-export it, or remove it.")
    elif stats.non_finite:
        result.add(ERROR, 'non_finite', f"{stats.non_finite} NaN/inf sample(s): they turn the loss into NaN. "
                                        f"Fix: re-export the file (e.g. as 16-bit PCM), or remove it.")
    elif stats.peak < SILENT_PEAK:
        level = f"{20 * math.log10(stats.peak):.0f} dBFS" if stats.peak > 0 else "digital silence"
        result.add(ERROR, 'silent', f"all-silent clip (peak {level}): it teaches the model to output silence. "
                                    f"Fix: remove it or replace it with the intended audio.")
    else:
        if stats.rms_db < QUIET_RMS_DB:
            result.add(WARNING, 'quiet', f"very quiet (RMS {stats.rms_db:.0f} dBFS): the model learns quiet output. "
                                         f"Consider normalising its loudness.")
        for severity, code, message in silence_problems(silence_profile(wav, sample_rate), allow_silence):
            result.add(severity, code, message)
    if stats.clipped_fraction > CLIPPED_FRACTION or stats.peak > 1.0:
        result.add(WARNING, 'clipping', f"{stats.clipped_fraction:.2%} of samples at full scale (peak "
                                        f"{stats.peak:.2f}): clipped/distorted audio. Consider lowering its gain.")


def _flag_truncated(result: FileCheck, declared: float, actual: float) -> None:
    result.truncated = True
    result.add(ERROR, 'truncated_audio', f"the file is cut short: its header declares {declared:.2f} s but only "
                                         f"{actual:.2f} s of audio is there (interrupted copy or download?). "
                                         f"Fix: copy or export it again.")
