"""`prepare`: turn a folder of audio or a metadata.json into an AudioCraft dataset in one call.

Writes `<egs_root>/<name>/{train,valid,evaluate,generate}/data.jsonl` (evaluate = valid, generate = the first few
valid clips), a MusicInfo sidecar for every clip (see `placement.py` for where), and
`<config_root>/dset/audio/<name>.yaml`. Raises `DataError` naming every unusable input file. Then it runs the
checks `validate` and the solver run (`PreparedDataset.report`): a dataset they would refuse is reported as such,
with no "Next:" command (the command line exits with an error).

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
from .audio_files import AudioReadError, probe_audio, read_audio
from .manifests import SPLITS, manifest_entry, write_dset_yaml, write_manifest, written_path
from .placement import ClipPlacer, PlacedAudio
from .report import ValidationReport
from .silence import ALLOW_SILENCE_KEY, TrimPlan, plan_trim, silence_profile
from .sources import SourceClip, collect_clips
from .splits import assign_splits
from .summary import (MAX_SEGMENT_SECONDS, duration_stats, format_duration, length_histogram,
                      suggest_segment_duration, train_command, validate_command)
from .validate import validate_datasource

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
    report: tp.Optional[ValidationReport] = None  # the checks `validate` and training run, on what was written
    config_root: tp.Optional[str] = None  # as given, when it is not the checkout's config/ (dora can't see it)
    datasource: tp.Dict[str, str] = field(default_factory=dict)  # split -> folder, as the dset yaml holds them
    base_model: tp.Optional[str] = None
    trimmed: tp.List[str] = field(default_factory=list)  # "path: 3.0 s of silence removed" lines

    @property
    def ok(self) -> bool:
        """No check failed: training can start."""
        return self.report is None or self.report.ok

    @property
    def next_command(self) -> str:
        return train_command(self.name, self.suggested_segment_duration, self.base_model,
                             self.datasource if self.config_root is not None else None)

    @property
    def validate_command(self) -> str:
        return validate_command(self.name, self.suggested_segment_duration, self.config_root)

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
        return '\n'.join(lines + self._check_lines() + self._next_lines())

    def _check_lines(self) -> tp.List[str]:
        """What the checks `validate` and training run found on the written dataset."""
        if self.report is None:
            return []
        report = self.report
        lines = [f"Checked like `validate` and the training run do (segment_duration="
                 f"{self.suggested_segment_duration} s): {len(report.errors)} error(s), "
                 f"{len(report.warnings)} warning(s)"]
        if report.errors:
            lines += report.grouped(report.errors)
        if report.warnings:
            lines += report.grouped(report.warnings)
        return lines

    def _next_lines(self) -> tp.List[str]:
        if not self.ok:
            return [f"NOT READY: training refuses this dataset until the {len(self.report.errors)} error(s) above "
                    f"are fixed. Fix them, then run `audiocraft-lora prepare` again (or check with: "
                    f"{self.validate_command})."]
        lines = [f"The dataset is validated automatically before training (or again: {self.validate_command})."]
        if self.config_root is not None:
            lines.append(f"(`dora run` reads dset yamls only from the checkout's config/, so the command passes the "
                         f"split folders of {self.dset_yaml} directly.)")
        lines.append(f"Next: {self.next_command}")
        if not self.base_model:
            lines.append("      (offline, or with a local base: add base_model=/path/to/local/musicgen-small, an "
                         "AudioCraft or Hugging Face folder; or pass --base-model to prepare)")
        return lines


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
                    sidecar_dir: tp.Optional[tp.Union[str, Path]] = None, skip_bad: bool = False,
                    trim_silence: bool = False, keep_silence: bool = False, overwrite_sidecars: bool = False,
                    base_model: tp.Optional[str] = None, check: bool = True) -> PreparedDataset:
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
        trim_silence (bool): Write copies of clips without their leading/trailing silence (the originals are never
            touched) and leave out clips that are mostly silent even once trimmed (see `silence.py`).
        keep_silence (bool): The silence in these clips is intended: mark every clip `"allow_silence": true` in its
            sidecar, so that `validate` and training only warn about it.
        overwrite_sidecars (bool): Replace existing `<stem>.json` next to the sources even when they hold other
            values (a `.bak` copy of each is kept); by default such clips are mirrored and the files left alone.
        base_model (str, optional): Put `base_model=...` in the printed training command.
        check (bool): Run the checks of `validate` on the written dataset (`PreparedDataset.report`).
    Raises:
        DataError: Bad options, or unusable input files (all listed at once, each with the fix).
    """
    name = name or default_name(source)
    _check_options(name, valid_ratio, num_generate, segment_seconds, sample_rate, channels)
    if trim_silence and keep_silence:
        raise DataError("--trim-silence and --keep-silence contradict each other. Fix: pass one of them.")
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
        raise DataError(f"{len(problems)} problem(s) with the inputs in {source}:\n{listing}\n"
                        f"Fix each one, or pass --skip-bad to leave them out.")
    warnings += [f"skipped: {problem}" for problem in problems]
    trims: tp.Dict[int, TrimPlan] = {}
    if trim_silence:
        clips, trims = _plan_trims(clips, warnings)
    if keep_silence:
        for clip in clips:
            clip.info[ALLOW_SILENCE_KEY] = True
    train, valid, split_warnings = assign_splits(clips, valid_ratio, seed)
    warnings += split_warnings

    placer = ClipPlacer(audio_dir, Path(sidecar_dir) if sidecar_dir else None, sample_rate, channels,
                        overwrite_sidecars, sources=[clip.audio_path for clip in collected.clips])
    placed: tp.Dict[str, tp.List[tp.Tuple[SourceClip, PlacedAudio]]] = {}
    for split, split_clips in (('train', train), ('valid', valid)):
        placed[split] = [(clip, entry) for clip in split_clips
                         for entry in _place(placer, clip, headers[id(clip)], convert, segment_seconds,
                                             trims.get(id(clip)))]
    splits = {split: [manifest_entry(entry.path, entry.duration, entry.sample_rate, relative_root)
                      for _, entry in placed[split]] for split in ('train', 'valid')}
    splits['evaluate'] = list(splits['valid'])
    splits['generate'] = _generate_subset(placed['valid'], splits['valid'], num_generate)

    split_dirs = {split: egs_root / name / split for split in SPLITS}
    manifests = {split: write_manifest(split_dirs[split], splits[split]) for split in SPLITS}
    datasource = {split: written_path(folder, relative_root) for split, folder in split_dirs.items()}
    dset_yaml = write_dset_yaml(config_root, name, datasource)

    if placer.not_writable:
        warnings.append(f"{len(placer.not_writable)} source folder(s) are not writable: those clips were mirrored "
                        f"(symlink + sidecar) into {audio_dir}.")
    if placer.dropped_tail_seconds:
        warnings.append(f"dropped {placer.dropped_tail_seconds:.1f} s of end-of-file remainders shorter than half a "
                        f"segment (they would be mostly padding).")
    warnings += _sidecar_warnings(placer, audio_dir)
    uncaptioned_entries = sum(1 for clip, _ in placed['train'] + placed['valid'] if not clip.has_caption)
    uncaptioned_sources = sorted({str(clip.audio_path) for clip in clips if not clip.has_caption})
    counts: tp.Dict[str, int] = {}
    for _, entry in placed['train'] + placed['valid']:
        counts[entry.placement] = counts.get(entry.placement, 0) + 1
    durations = [meta.duration for meta in splits['train'] + splits['valid']]
    suggested = suggest_segment_duration(durations)
    report = None
    if check:
        report = validate_datasource({split: str(manifest) for split, manifest in manifests.items()},
                                     sample_rate=sample_rate, channels=channels, segment_duration=suggested,
                                     base_dir=relative_root)
    own_config = os.path.abspath(config_root) == os.path.abspath(CONFIG_DIR)
    return PreparedDataset(
        name=name, source=Path(source), manifests=manifests, dset_yaml=dset_yaml, splits=splits, placements=counts,
        uncaptioned=[Path(path) for path in uncaptioned_sources], uncaptioned_entries=uncaptioned_entries,
        warnings=warnings, suggested_segment_duration=suggested, report=report,
        config_root=None if own_config else str(config_root), datasource=datasource,
        base_model=_base_model_word(base_model),
        trimmed=[f"{clip.audio_path}: {trims[id(clip)].removed:.1f} s of silence removed"
                 for clip in clips if id(clip) in trims])


def _plan_trims(clips: tp.List[SourceClip],
                warnings: tp.List[str]) -> tp.Tuple[tp.List[SourceClip], tp.Dict[int, TrimPlan]]:
    """Decode every clip once to find its silence: clips to trim, and the ones left out (each named in `warnings`).

    Planned before the train/valid split, so that leaving a clip out can't empty a split after it was drawn.
    """
    kept, trims, dropped = [], {}, []
    for clip in clips:
        try:
            wav, sample_rate = read_audio(clip.audio_path)
        except AudioReadError as exc:
            raise DataError(f"{clip.audio_path}: {exc}. Fix: re-export it as wav/flac, or remove it.") from exc
        plan = plan_trim(silence_profile(wav, sample_rate))
        if plan is not None and plan.dropped:
            dropped.append(f"{clip.audio_path} ({plan.dropped})")
            continue
        kept.append(clip)
        if plan is not None:
            trims[id(clip)] = plan
    if dropped:
        warnings.append(f"--trim-silence left out {len(dropped)} clip(s) that are silence even once trimmed: "
                        f"{'; '.join(dropped)}.")
    if trims:
        removed = sum(plan.removed for plan in trims.values())
        warnings.append(f"--trim-silence: {len(trims)} clip(s) had leading/trailing silence; trimmed copies "
                        f"({removed:.1f} s of silence removed in all) are in the audio folder, originals untouched.")
    return kept, trims


def _sidecar_warnings(placer: ClipPlacer, audio_dir: Path) -> tp.List[str]:
    """What happened to sidecars that already existed next to the sources."""
    warnings = []
    if placer.kept_sidecars:
        shown = '; '.join(f"{path}: {why}" for path, why in placer.kept_sidecars[:3])
        more = f" (+{len(placer.kept_sidecars) - 3} more)" if len(placer.kept_sidecars) > 3 else ''
        warnings.append(f"{len(placer.kept_sidecars)} existing sidecar(s) next to the sources hold other values or "
                        f"can't be read, so they were left untouched and those clips were mirrored (symlink + this "
                        f"dataset's sidecar) into {audio_dir}: {shown}{more}. To replace them instead (a .bak copy "
                        f"of each is kept), pass --overwrite-sidecars.")
    if placer.replaced_sidecars:
        shown = ', '.join(str(backup) for _, backup in placer.replaced_sidecars[:3])
        warnings.append(f"--overwrite-sidecars replaced {len(placer.replaced_sidecars)} sidecar(s) holding other "
                        f"values; the previous files are kept as {shown}"
                        f"{' ...' if len(placer.replaced_sidecars) > 3 else ''}.")
    return warnings


def _base_model_word(base_model: tp.Optional[str]) -> tp.Optional[str]:
    """A local base folder as an absolute path (the command may be run from elsewhere); a hub id as given."""
    if not base_model:
        return None
    return os.path.abspath(base_model) if Path(base_model).exists() else base_model


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


def _place(placer: ClipPlacer, clip: SourceClip, header, convert: bool, segment_seconds: tp.Optional[float],
           trim: tp.Optional[TrimPlan]) -> tp.List[PlacedAudio]:
    try:
        return placer.place(clip, header, convert, segment_seconds, trim)
    except AudioReadError as exc:
        raise DataError(f"{clip.audio_path}: {exc}. Fix: re-export it as wav/flac, or remove it.") from exc


def _generate_subset(placed_valid: tp.List[tp.Tuple[SourceClip, PlacedAudio]], valid: tp.List[AudioMeta],
                     num_generate: int) -> tp.List[AudioMeta]:
    """The first valid entries, one per source file and caption before any second chunk or repeated caption:
    AudioCraft names a generated sample after its conditioning, so two samples of one caption would write one file
    (the second overwrites the first, while both are measured)."""
    firsts, rest, seen = [], [], set()
    for (clip, _), meta in zip(placed_valid, valid):
        keys = {str(clip.audio_path), 'caption:' + str(clip.info.get('description') or clip.audio_path)}
        (rest if keys & seen else firsts).append(meta)
        seen |= keys
    return (firsts + rest)[:num_generate]
