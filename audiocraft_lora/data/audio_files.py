"""Audio file access shared by `prepare` and `validate`: header probing, decoding, statistics and writing.

Decoding goes through AudioCraft's own `audio_read` so that what we check is exactly what training reads.
"""
from dataclasses import dataclass
import hashlib
import math
import os
from pathlib import Path
import struct
import typing as tp

import av
import numpy as np
import soundfile
import torch

from audiocraft.data.audio import audio_read
from audiocraft.data.audio_utils import convert_audio

from ..checkpoint_io import temporary_sibling

AUDIO_EXTENSIONS = ('.wav', '.mp3', '.flac', '.ogg', '.m4a')
SILENCE_DB = -60.0  # a 100 ms window quieter than this (RMS, dBFS) counts as silence
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped


class AudioReadError(Exception):
    """An audio file can't be probed or decoded; the message says why in plain words."""


@dataclass(frozen=True)
class AudioHeader:
    """What the file header says, without decoding.

    Attributes:
        sample_rate (int): Sample rate in Hz.
        channels (int): Number of channels.
        num_frames (int): Number of frames (samples per channel).
    """
    sample_rate: int
    channels: int
    num_frames: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate if self.sample_rate > 0 else 0.0


@dataclass(frozen=True)
class AudioStats:
    """Statistics of a fully decoded file (all channels together).

    Attributes:
        num_frames (int): Decoded frames.
        peak (float): Max absolute finite sample value.
        rms_db (float): RMS level in dBFS (-inf for digital silence).
        non_finite (int): Number of NaN or inf samples.
        clipped_fraction (float): Fraction of samples at or above `CLIP_LEVEL` in absolute value.
        silent_fraction (float): Fraction of 100 ms windows quieter than `SILENCE_DB`.
    """
    num_frames: int
    peak: float
    rms_db: float
    non_finite: int
    clipped_fraction: float
    silent_fraction: float


def is_audio_file(path: Path) -> bool:
    """Whether `path` has one of the audio extensions AudioCraft reads (case-insensitive)."""
    return path.suffix.lower() in AUDIO_EXTENSIONS


def probe_audio(path: tp.Union[str, Path]) -> AudioHeader:
    """Read the header of an audio file (soundfile first, then PyAV for what libsndfile can't open).

    Raises:
        AudioReadError: The file is not decodable audio.
    """
    path = str(path)
    try:
        info = soundfile.info(path)
        if info.samplerate > 0 and info.frames >= 0:
            return AudioHeader(int(info.samplerate), int(info.channels), int(info.frames))
    except Exception:  # noqa: BLE001 - libsndfile can't open it; try ffmpeg below.
        pass
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioReadError("the file has no audio stream")
            stream = container.streams.audio[0]
            sample_rate = int(stream.codec_context.sample_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                raise AudioReadError("the header has no duration")
            if sample_rate <= 0:
                raise AudioReadError("the header has no sample rate")
            return AudioHeader(sample_rate, int(stream.channels), int(round(duration * sample_rate)))
    except AudioReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one readable message.
        raise AudioReadError(f"not a readable audio file ({_short_reason(exc)})") from exc


def declared_wav_frames(path: tp.Union[str, Path]) -> tp.Optional[int]:
    """Frames a RIFF/WAVE header declares in its `data` chunk (None if not a plain WAV or size unknown).

    libsndfile silently shrinks the duration of a truncated WAV to what is on disk, so truncation is only visible
    by comparing this declared size to the decoded length.
    """
    try:
        with open(path, 'rb') as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'WAVE':
                return None
            block_align = 0
            while True:
                chunk = handle.read(8)
                if len(chunk) < 8:
                    return None
                chunk_id, size = chunk[:4], struct.unpack('<I', chunk[4:])[0]
                if chunk_id == b'fmt ':
                    fmt = handle.read(size + (size & 1))
                    if len(fmt) >= 14:
                        block_align = struct.unpack('<H', fmt[12:14])[0]
                elif chunk_id == b'data':
                    if block_align <= 0 or size in (0xFFFFFFFF, 0):
                        return None
                    return size // block_align
                else:
                    handle.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        return None


def read_audio(path: tp.Union[str, Path]) -> tp.Tuple[torch.Tensor, int]:
    """Decode a whole file with AudioCraft's `audio_read`.

    Returns:
        tuple of torch.Tensor, int: wav [C, T] float32, and its sample rate.
    Raises:
        AudioReadError: The file can't be decoded.
    """
    try:
        wav, sample_rate = audio_read(str(path))
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one readable message.
        raise AudioReadError(f"decoding failed ({_short_reason(exc)})") from exc
    return wav, int(sample_rate)


def convert_to_target(wav: torch.Tensor, sample_rate: int, target_sample_rate: int,
                      target_channels: int) -> torch.Tensor:
    """Resample and down/up-mix like AudioCraft's dataset does.

    Args:
        wav (torch.Tensor): [C, T] audio.
    Returns:
        torch.Tensor: [target_channels, T'] audio at `target_sample_rate`.
    """
    return convert_audio(wav, sample_rate, target_sample_rate, target_channels)


def write_audio(path: tp.Union[str, Path], wav: torch.Tensor, sample_rate: int) -> Path:
    """Write [C, T] float audio as 16-bit PCM (FLAC or WAV from the suffix), atomically.

    Samples are clamped to [-1, 1] first.
    """
    path = Path(path)
    fmt = {'.flac': 'FLAC', '.wav': 'WAV'}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"write_audio writes .flac or .wav, not {path.suffix!r}")
    data = wav.detach().clamp(-1, 1).t().cpu().numpy()
    tmp = temporary_sibling(path)
    try:
        soundfile.write(str(tmp), data, sample_rate, subtype='PCM_16', format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def audio_stats(wav: torch.Tensor, sample_rate: int) -> AudioStats:
    """Level statistics of decoded audio.

    Args:
        wav (torch.Tensor): [C, T] audio.
        sample_rate (int): Its sample rate (for the 100 ms windows).
    """
    data = wav.detach().cpu().numpy().astype(np.float64, copy=False)
    finite = np.isfinite(data)
    non_finite = int(data.size - finite.sum())
    clean = np.where(finite, data, 0.0)
    num_frames = int(data.shape[-1])
    if clean.size == 0:
        return AudioStats(num_frames, 0.0, -math.inf, non_finite, 0.0, 1.0)
    peak = float(np.abs(clean).max())
    mean_square = float(np.mean(clean ** 2))
    rms_db = 10 * math.log10(mean_square) if mean_square > 0 else -math.inf
    clipped = float(np.mean(np.abs(clean) >= CLIP_LEVEL))
    window = max(1, sample_rate // 10)
    usable = (num_frames // window) * window
    if usable == 0:
        silent = 1.0 if rms_db < SILENCE_DB else 0.0
    else:
        frames = clean[:, :usable].reshape(clean.shape[0], -1, window)
        window_ms = np.mean(frames ** 2, axis=(0, 2))
        threshold = 10 ** (SILENCE_DB / 10)
        silent = float(np.mean(window_ms < threshold))
    return AudioStats(num_frames, peak, rms_db, non_finite, clipped, silent)


def file_digest(path: tp.Union[str, Path]) -> str:
    """Content hash of a file (to find the same audio under two names)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
