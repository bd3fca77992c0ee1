"""`prepare`: turn a folder of audio or a metadata.json into an AudioCraft dataset in one call.

Writes `<egs_root>/<name>/{train,valid,evaluate,generate}/data.jsonl` (evaluate = valid, generate = the first few
valid clips), a MusicInfo sidecar for every clip (see `placement.py` for where), and
`<config_root>/dset/audio/<name>.yaml`. Raises `DataError` naming every unusable input file.

Example:
    result = prepare_dataset('my_clips/', name='mystyle')
    print(result.summary())
"""
from dataclasses import dataclass, field
import os
from pathlib import Path
import re
import typing as tp

from audiocraft.data.audio_dataset import AudioMeta

from ..checkout import CONFIG_DIR
from ..errors import DataError
from .audio_files import AudioReadError, probe_audio
from .manifests import SPLITS, manifest_entry, write_dset_yaml, write_manifest, written_path
from .placement import ClipPlacer, PlacedAudio
from .sources import SourceClip, collect_clips
from .splits import assign_splits
from .summary import (MAX_SEGMENT_SECONDS, duration_stats, format_duration, length_histogram,
                      suggest_segment_duration, train_command)

NAME_PATTERN = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


@dataclass
class PreparedDataset:
    """What `prepare_dataset` wrote, and what to tell the user."""
    name: str
    source: Path
    manifests: tp.Dict[str, Path]
    dset_yaml: Path
    splits: tp.Dict[str, tp.List[AudioMeta]]
    placements: tp.Dict[str, int]
    uncaptioned: tp.List[Path] = field(default_factory=list)  # source files without a caption
    uncaptioned_entries: int = 0
    warnings: tp.List[str] = field(default_factory=list)
    suggested_segment_duration: int = MAX_SEGMENT_SECONDS

    @property
    def next_command(self) -> str:
        return train_command(self.name, self.suggested_segment_duration)

    def summary(self) -> str:
        """Human-readable report: clips per split, lengths, captions, warnings and the next command."""
        unique = self.splits['train'] + self.splits['valid']
        durations = [meta.duration for meta in unique]
        stats = duration_stats(durations)
        lines = [f"Prepared dataset '{self.name}' from {self.source}"]
        for split in SPLITS:
            metas = self.splits[split]
            note = {'evaluate': ' (= valid)', 'generate': ' (first valid clips: their descriptions are the sample '
                                                          'prompts)'}.get(split, '')
            total = format_duration(sum(meta.duration for meta in metas))
            lines.append(f"  {split:<9} {len(metas):>5} clips  {total:>14}{note}")
        lines.append(f"Clip length: min {stats.minimum:.1f} s, median {stats.median:.1f} s, max {stats.maximum:.1f} s"
                     f" (total {format_duration(stats.total)})")
        lines += length_histogram(durations)
        lines.append(f"Captions: {len(unique) - self.uncaptioned_entries}/{len(unique)} clips captioned, "
                     f"{len(self.uncaptioned)} source file(s) without a caption")
        lines.append("Audio: " + ', '.join(f"{count} {kind.replace('_', ' ')}"
                                           for kind, count in sorted(self.placements.items()) if count))
        lines.append(f"Wrote: {', '.join(str(path) for path in self.manifests.values())}")
        lines.append(f"       {self.dset_yaml}")
        for warning in self.warnings:
            lines.append(f"Warning: {warning}")
        lines.append(f"Suggested dataset.segment_duration={self.suggested_segment_duration} (median clip length, "
                     f"capped at {MAX_SEGMENT_SECONDS} s, rounded down: shorter clips would be padded).")
        lines.append("The dataset is validated automatically before training (or now: "
                     f"audiocraft-lora validate dset=audio/{self.name} "
                     f"--segment-duration {self.suggested_segment_duration}).")
        lines.append(f"Next: {self.next_command}")
        return '\n'.join(lines)


def default_name(source: tp.Union[str, Path]) -> str:
    """A dset name from the source folder (or the metadata file's folder): ASCII letters, digits, '_', '-', '.'."""
    source = Path(os.path.abspath(source))
    base = source.name if source.is_dir() else source.parent.name
    slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', base).strip('_.-')
    return slug or 'dataset'


def prepare_dataset(source: tp.Union[str, Path], name: tp.Optional[str] = None, *,
                    egs_root: tp.Union[str, Path] = 'egs', config_root: tp.Union[str, Path] = CONFIG_DIR,
                    description: tp.Optional[str] = None, valid_ratio: float = 0.2, seed: int = 0,
                    num_generate: int = 4, relative_to: tp.Optional[tp.Union[str, Path]] = None,
                    segment_seconds: tp.Optional[float] = None, sample_rate: int = 32000, channels: int = 1,
                    convert: bool = False, audio_dir: tp.Optional[tp.Union[str, Path]] = None,
                    sidecar_dir: tp.Optional[tp.Union[str, Path]] = None, skip_bad: bool = False) -> PreparedDataset:
    """Build an AudioCraft dataset from user audio.

    Args:
        source (str or Path): A folder of audio files, or a metadata .json/.jsonl (see `sources.py`).
        name (str, optional): Dataset name (`dset=audio/<name>`); default: from the source folder name.
        egs_root (str or Path): Where `<name>/<split>/data.jsonl` go.
        config_root (str or Path): Where `dset/audio/<name>.yaml` goes; default: the checkout's `config/`, the
            tree `dora run` reads (`dset=audio/<name>` from any folder).
        description (str, optional): Caption for every clip that has none of its own.
        valid_ratio (float): Fraction of clips held out for validation when the source gives no split.
        seed (int): Seed of that split.
        num_generate (int): At most this many valid clips form the `generate` split.
        relative_to (str or Path, optional): Write manifest paths and the dset yaml's split folders relative to
            this folder (AudioCraft resolves them against the folder `dora run` is launched from); absolute paths
            otherwise.
        segment_seconds (float, optional): Cut longer files into chunks of this length (written as FLAC).
        sample_rate (int): Sample rate of converted or cut audio.
        channels (int): Channels of converted or cut audio.
        convert (bool): Convert files not already at `sample_rate`/`channels` (otherwise the dataset converts
            them on the fly at every step).
        audio_dir (str or Path, optional): Folder for converted/cut/mirrored audio; default `<egs_root>/<name>/audio`.
        sidecar_dir (str or Path, optional): Leave the source untouched: mirror every clip (symlink + sidecar) here.
        skip_bad (bool): Leave out unusable inputs with a warning instead of failing.
    Raises:
        DataError: Bad options, or unusable input files (all listed at once, each with the fix).
    """
    name = name or default_name(source)
    _check_options(name, valid_ratio, num_generate, segment_seconds, sample_rate, channels)
    egs_root, config_root = Path(egs_root), Path(config_root)
    audio_dir = Path(audio_dir) if audio_dir is not None else egs_root / name / 'audio'
    relative_root = Path(relative_to) if relative_to is not None else None
    exclude = [path for path in (egs_root, audio_dir, sidecar_dir, config_root) if path is not None]

    collected = collect_clips(source, description, exclude=[Path(path) for path in exclude])
    warnings = list(collected.warnings)
    clips, headers, problems = _probe_all(_dedupe(collected.clips, warnings))
    problems = collected.errors + problems
    if problems and not skip_bad:
        listing = '\n'.join(f"  - {problem}" for problem in problems)
        raise DataError(f"{len(problems)} unusable input(s) in {source}:\n{listing}\n"
                        f"Fix each one, or pass --skip-bad to leave them out.")
    warnings += [f"skipped: {problem}" for problem in problems]
    train, valid, split_warnings = assign_splits(clips, valid_ratio, seed)
    warnings += split_warnings

    placer = ClipPlacer(audio_dir, Path(sidecar_dir) if sidecar_dir else None, sample_rate, channels)
    placed: tp.Dict[str, tp.List[tp.Tuple[SourceClip, PlacedAudio]]] = {}
    for split, split_clips in (('train', train), ('valid', valid)):
        placed[split] = [(clip, entry) for clip in split_clips
                         for entry in _place(placer, clip, headers[id(clip)], convert, segment_seconds)]
    splits = {split: [manifest_entry(entry.path, entry.duration, entry.sample_rate, relative_root)
                      for _, entry in placed[split]] for split in ('train', 'valid')}
    splits['evaluate'] = list(splits['valid'])
    splits['generate'] = _generate_subset(placed['valid'], splits['valid'], num_generate)

    split_dirs = {split: egs_root / name / split for split in SPLITS}
    manifests = {split: write_manifest(split_dirs[split], splits[split]) for split in SPLITS}
    dset_yaml = write_dset_yaml(config_root, name, {split: written_path(folder, relative_root)
                                                    for split, folder in split_dirs.items()})

    if placer.not_writable:
        warnings.append(f"{len(placer.not_writable)} source folder(s) are not writable: those clips were mirrored "
                        f"(symlink + sidecar) into {audio_dir}.")
    if placer.dropped_tail_seconds:
        warnings.append(f"dropped {placer.dropped_tail_seconds:.1f} s of end-of-file remainders shorter than half a "
                        f"segment (they would be mostly padding).")
    uncaptioned_entries = sum(1 for clip, _ in placed['train'] + placed['valid'] if not clip.has_caption)
    uncaptioned_sources = sorted({str(clip.audio_path) for clip in clips if not clip.has_caption})
    if uncaptioned_sources:
        shown = ', '.join(uncaptioned_sources[:3]) + (' ...' if len(uncaptioned_sources) > 3 else '')
        warnings.append(f"{len(uncaptioned_sources)} clip(s) have no caption ({shown}); they were written with an "
                        f"empty description, which `validate` refuses (AudioCraft would train them with no text). "
                        f"Fix: add a <stem>.txt next to each, a text field in the metadata, or --description.")
    counts: tp.Dict[str, int] = {}
    for _, entry in placed['train'] + placed['valid']:
        counts[entry.placement] = counts.get(entry.placement, 0) + 1
    durations = [meta.duration for meta in splits['train'] + splits['valid']]
    return PreparedDataset(
        name=name, source=Path(source), manifests=manifests, dset_yaml=dset_yaml, splits=splits, placements=counts,
        uncaptioned=[Path(path) for path in uncaptioned_sources], uncaptioned_entries=uncaptioned_entries,
        warnings=warnings,
        suggested_segment_duration=suggest_segment_duration(durations))


def _check_options(name: str, valid_ratio: float, num_generate: int, segment_seconds: tp.Optional[float],
                   sample_rate: int, channels: int) -> None:
    if not NAME_PATTERN.match(name):
        raise DataError(f"dataset name {name!r} must use ASCII letters, digits, '_', '-' or '.' (it becomes "
                        f"dset=audio/<name>). Fix: pass --name with such a name.")
    if not 0 < valid_ratio < 1:
        raise DataError(f"--valid-ratio must be between 0 and 1 (exclusive), got {valid_ratio}.")
    if num_generate < 1:
        raise DataError(f"--num-generate must be at least 1, got {num_generate}.")
    if segment_seconds is not None and segment_seconds <= 0:
        raise DataError(f"--segment-seconds must be > 0, got {segment_seconds}.")
    if sample_rate <= 0 or channels not in (1, 2):
        raise DataError(f"--sample-rate must be > 0 and --channels 1 or 2, got {sample_rate} / {channels}.")


def _dedupe(clips: tp.List[SourceClip], warnings: tp.List[str]) -> tp.List[SourceClip]:
    seen: tp.Dict[str, SourceClip] = {}
    for clip in clips:
        key = os.path.realpath(clip.audio_path)
        if key in seen:
            warnings.append(f"{clip.origin}: {clip.audio_path} is listed twice (first at {seen[key].origin}); "
                            f"kept once.")
        else:
            seen[key] = clip
    return list(seen.values())


def _probe_all(clips: tp.List[SourceClip]):
    kept, headers, problems = [], {}, []
    for clip in clips:
        try:
            header = probe_audio(clip.audio_path)
        except AudioReadError as exc:
            problems.append(f"{clip.audio_path}: {exc}. Fix: re-export it as wav/flac, or remove it.")
            continue
        except OSError as exc:
            problems.append(f"{clip.audio_path}: can't be opened ({exc}). Fix: check it exists and is readable.")
            continue
        if header.num_frames <= 0:
            problems.append(f"{clip.audio_path}: contains no audio (0 frames). Fix: re-export it, or remove it.")
            continue
        kept.append(clip)
        headers[id(clip)] = header
    return kept, headers, problems


def _place(placer: ClipPlacer, clip: SourceClip, header, convert: bool,
           segment_seconds: tp.Optional[float]) -> tp.List[PlacedAudio]:
    try:
        return placer.place(clip, header, convert, segment_seconds)
    except AudioReadError as exc:
        raise DataError(f"{clip.audio_path}: {exc}. Fix: re-export it as wav/flac, or remove it.") from exc


def _generate_subset(placed_valid: tp.List[tp.Tuple[SourceClip, PlacedAudio]], valid: tp.List[AudioMeta],
                     num_generate: int) -> tp.List[AudioMeta]:
    """The first valid entries, one per source file before any second chunk of the same file."""
    firsts, rest, seen = [], [], set()
    for (clip, _), meta in zip(placed_valid, valid):
        (rest if str(clip.audio_path) in seen else firsts).append(meta)
        seen.add(str(clip.audio_path))
    return (firsts + rest)[:num_generate]
