"""Where each prepared clip's audio and sidecar live, so that `Path(path).with_suffix('.json')` finds the sidecar.

Five placements, chosen per clip by `prepare`:
    in place   the source file is referenced as is, its sidecar written next to it (only when that adds to, and never
               changes, an existing sidecar: see `sidecars.sidecar_conflict`);
    mirrored   a symlink to the source (a copy where links are unsupported) inside a mirror folder, sidecar next to
               the link: used with --sidecar-dir, with --keep-silence (that choice stays this dataset's), when the
               source folder is not writable, when two sources would
               share a sidecar (`a.wav` and `a.mp3` both map to `a.json`), or when the existing sidecar next to the
               source holds other values (another dataset's captions, the user's own file) or can't be read;
    converted  decoded, resampled/down-mixed to the target format and written as 16-bit FLAC;
    trimmed    like converted, with its leading/trailing silence cut (--trim-silence);
    cut        like converted, in chunks of --segment-seconds.
The user's audio is never modified; their sidecars only with --overwrite-sidecars, after a `.bak` copy.
"""
from dataclasses import dataclass
import errno
import os
from pathlib import Path
import shutil
import typing as tp

import torch

from ..errors import DataError
from .audio_files import AudioHeader, convert_to_target, read_audio, write_audio
from .sidecars import (backup_sidecar, sidecar_allows_silence, sidecar_conflict, sidecar_path_for, sidecar_unchanged,
                       write_sidecar)
from .silence import ALLOW_SILENCE_KEY, TrimPlan
from .sources import SourceClip

MIN_TAIL_RATIO = 0.5  # a last chunk shorter than this fraction of the segment is dropped rather than padded


@dataclass
class PlacedAudio:
    """One manifest entry produced from a source clip."""
    path: Path
    duration: float
    sample_rate: int
    placement: str  # 'in_place' | 'mirrored' | 'converted' | 'trimmed' | 'cut'


class ClipPlacer:
    """Materializes source clips as manifest entries with a sidecar each.

    Args:
        audio_dir (Path): Folder for converted/cut audio, and the mirror used when in-place sidecars can't be written.
        sidecar_dir (Path, optional): Mirror every clip there instead of writing next to the sources.
        sample_rate (int): Target sample rate of converted/cut audio.
        channels (int): Target channels of converted/cut audio.
        overwrite_sidecars (bool): Replace existing sidecars next to the sources even when they hold other values
            (each is copied to `<stem>.json.bak` first); otherwise such clips are mirrored.
    """

    def __init__(self, audio_dir: Path, sidecar_dir: tp.Optional[Path], sample_rate: int, channels: int,
                 overwrite_sidecars: bool = False, sources: tp.Iterable[Path] = ()):
        self.audio_dir = Path(os.path.abspath(audio_dir))
        self.sidecar_dir = Path(os.path.abspath(sidecar_dir)) if sidecar_dir is not None else None
        self.sample_rate = sample_rate
        self.channels = channels
        self._taken_sidecars: tp.Set[str] = set()
        self.not_writable: tp.List[Path] = []  # sources whose folder refused the sidecar
        self.dropped_tail_seconds = 0.0
        self.overwrite_sidecars = overwrite_sidecars
        self.kept_sidecars: tp.List[tp.Tuple[Path, str]] = []  # (user sidecar left untouched, why)
        self.replaced_sidecars: tp.List[tp.Tuple[Path, Path]] = []  # (sidecar replaced, its backup)
        self._sources = {os.path.realpath(path) for path in sources}  # the user's audio: never replaced

    def matches_target(self, header: AudioHeader) -> bool:
        return header.sample_rate == self.sample_rate and header.channels == self.channels

    def place(self, clip: SourceClip, header: AudioHeader, convert: bool, segment_seconds: tp.Optional[float],
              trim: tp.Optional[TrimPlan] = None) -> tp.List[PlacedAudio]:
        """Place one clip; returns its manifest entries (several when cut)."""
        if trim is not None:
            return self._trim(clip, trim, segment_seconds)
        if segment_seconds is not None and header.duration > segment_seconds * (1 + MIN_TAIL_RATIO / 10):
            return self._cut(clip, self._decode_to_target(clip), segment_seconds)
        if convert and not self.matches_target(header):
            return [self._write_copy(clip, self._decode_to_target(clip), 'converted')]
        if self.sidecar_dir is not None:
            return [self._mirror(clip, header, self.sidecar_dir)]
        sidecar = sidecar_path_for(clip.audio_path)
        if str(sidecar) in self._taken_sidecars:
            return [self._mirror(clip, header, self.audio_dir)]
        if clip.info.get(ALLOW_SILENCE_KEY) is True and not sidecar_allows_silence(clip.audio_path):
            # (--keep-silence is this dataset's choice: its own sidecar says so, not the user's next to the audio,
            # which every later dataset prepared from the same files would read)
            return [self._mirror(clip, header, self.audio_dir)]
        conflict = sidecar_conflict(sidecar, clip.info)
        if conflict and not self.overwrite_sidecars:
            self.kept_sidecars.append((sidecar, conflict))
            return [self._mirror(clip, header, self.audio_dir)]
        try:
            self._update_in_place(sidecar, clip, conflict)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self.not_writable.append(clip.audio_path)
            return [self._mirror(clip, header, self.audio_dir)]
        self._taken_sidecars.add(str(sidecar))
        return [PlacedAudio(clip.audio_path, header.duration, header.sample_rate, 'in_place')]

    def _update_in_place(self, sidecar: Path, clip: SourceClip, conflict: tp.Optional[str]) -> None:
        """Write the sidecar next to the source, backing up a conflicting one first (--overwrite-sidecars)."""
        if conflict:
            self.replaced_sidecars.append((sidecar, backup_sidecar(sidecar)))
        if not sidecar_unchanged(sidecar, clip.info):
            write_sidecar(sidecar, clip.info)

    def _mirror(self, clip: SourceClip, header: AudioHeader, mirror_root: Path) -> PlacedAudio:
        link = self._claim(mirror_root / clip.relative_name)
        link.parent.mkdir(parents=True, exist_ok=True)
        self._refuse_source(link)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            os.symlink(os.path.abspath(clip.audio_path), link)
        except OSError:
            shutil.copy2(clip.audio_path, link)
        write_sidecar(sidecar_path_for(link), clip.info)
        return PlacedAudio(link, header.duration, header.sample_rate, 'mirrored')

    def _write_copy(self, clip: SourceClip, wav: torch.Tensor, placement: str) -> PlacedAudio:
        path = self._claim(self.audio_dir / clip.relative_name.with_suffix('.flac'))
        self._refuse_source(path)
        write_audio(path, wav, self.sample_rate)
        write_sidecar(sidecar_path_for(path), clip.info)
        return PlacedAudio(path, wav.shape[-1] / self.sample_rate, self.sample_rate, placement)

    def _trim(self, clip: SourceClip, trim: TrimPlan, segment_seconds: tp.Optional[float]) -> tp.List[PlacedAudio]:
        """A copy without the leading/trailing silence (then cut, when long enough and --segment-seconds is set)."""
        wav = self._decode_to_target(clip)
        wav = wav[:, int(round(trim.start * self.sample_rate)):int(round(trim.end * self.sample_rate))]
        seconds = wav.shape[-1] / self.sample_rate
        if segment_seconds is not None and seconds > segment_seconds * (1 + MIN_TAIL_RATIO / 10):
            return self._cut(clip, wav, segment_seconds)
        return [self._write_copy(clip, wav, 'trimmed')]

    def _cut(self, clip: SourceClip, wav: torch.Tensor, segment_seconds: float) -> tp.List[PlacedAudio]:
        chunk = int(round(segment_seconds * self.sample_rate))
        placed = []
        for index, start in enumerate(range(0, wav.shape[-1], chunk)):
            piece = wav[:, start:start + chunk]
            if piece.shape[-1] < chunk * MIN_TAIL_RATIO:
                self.dropped_tail_seconds += piece.shape[-1] / self.sample_rate
                break
            stem = clip.relative_name.with_suffix('')
            path = self._claim(self.audio_dir / stem.parent / f"{stem.name}_{index:03d}.flac")
            self._refuse_source(path)
            write_audio(path, piece, self.sample_rate)
            write_sidecar(sidecar_path_for(path), clip.info)
            placed.append(PlacedAudio(path, piece.shape[-1] / self.sample_rate, self.sample_rate, 'cut'))
        return placed

    def _decode_to_target(self, clip: SourceClip) -> torch.Tensor:
        wav, sample_rate = read_audio(clip.audio_path)
        return convert_to_target(wav, sample_rate, self.sample_rate, self.channels)

    def _refuse_source(self, path: Path) -> None:
        """Our outputs (links, copies) may replace our earlier ones, never one of the user's audio files."""
        if not path.is_symlink() and os.path.realpath(path) in self._sources:
            raise DataError(f"prepare would replace your audio file {path} with its own output: the audio folder "
                            f"({self.audio_dir}) or sidecar folder holds the source clips. Fix: give --audio-dir / "
                            "--sidecar-dir a folder of their own (default: egs/<name>/audio).")

    def _claim(self, path: Path) -> Path:
        """`path`, renamed `<stem>-<n><suffix>` if its sidecar is already used by another clip of this run."""
        candidate, number = path, 1
        while str(sidecar_path_for(candidate)) in self._taken_sidecars:
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
            number += 1
        self._taken_sidecars.add(str(sidecar_path_for(candidate)))
        return candidate
