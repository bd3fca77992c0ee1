"""Check every entry of a dataset before any training step; the solver calls `validate_datasource` first.

Example:
    report = validate_datasource({'train': 'egs/x/train', 'valid': 'egs/x/valid'}, sample_rate=32000, channels=1,
                                 segment_duration=15.0)
    print(report.summary_table())
    report.raise_if_errors()

Error codes (training must not start): missing_manifest, unreadable_manifest, bad_manifest_line, empty_split,
missing_file, is_directory, unreadable, zero_length, corrupt_audio, truncated_audio, non_finite, silent,
mostly_silent and edge_silence (long leading/trailing silence; warnings when allowed or mild, see `silence.py`),
duration_mismatch, absurd_duration, channel_mismatch (channels that can't be converted), missing_sidecar,
invalid_sidecar, sidecar_missing_fields, empty_description, duplicate_across_splits, check_failed.
Warning codes (the dataset copes, but you should know): sample_rate_mismatch, channel_mismatch (down/up-mixed),
manifest_sample_rate, short_clip, quiet, partly_silent, edge_silence (mild), clipping, duplicate_in_split.

Headers are read for every file; the audio is fully decoded (AudioCraft's `audio_read`) to find silence, NaN/inf,
clipping and truncation unless `fast=True`. Each distinct file is checked once, in a small thread pool.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import os
from pathlib import Path
import typing as tp

from ..errors import DataError
from .file_checks import ERROR, WARNING, Expectations, FileCheck, check_audio_file
from .manifests import manifest_file, read_manifest, resolve_entry_path
from .report import DataIssue, SplitSummary, ValidationReport
from .summary import MAX_SEGMENT_SECONDS, suggest_segment_duration

DURATION_TOLERANCE_S = 0.5
DURATION_TOLERANCE_RATIO = 0.02
ABSURD_RATIO = 10.0
ABSURD_SECONDS = 24 * 3600.0
SHORT_CLIP_TOLERANCE_S = 0.05


@dataclass
class _Entry:
    split: str
    manifest: str
    line: int
    written_path: str
    path: Path
    duration: float
    sample_rate: int


def validate_datasource(datasource: tp.Mapping[str, tp.Any], sample_rate: int = 32000, channels: int = 1,
                        segment_duration: tp.Optional[float] = 30.0, min_segment_ratio: float = 0.5,
                        fast: bool = False, info_fields_required: bool = True,
                        allow_missing_description: bool = False, base_dir: tp.Optional[tp.Union[str, Path]] = None,
                        workers: tp.Optional[int] = None, allow_silence: bool = False) -> ValidationReport:
    """Check every entry of every split; never raises for a bad entry (see `ValidationReport.raise_if_errors`).

    Args:
        datasource (mapping): Split name -> folder holding data.jsonl(.gz), or the manifest file. Non-string values
            (e.g. `max_sample_rate` of a dset yaml's `datasource`) are ignored, so `cfg.datasource` can be passed.
        sample_rate (int): The model's sample rate (files at another rate are resampled: a warning).
        channels (int): The model's channels (files with another count are down/up-mixed: a warning).
        segment_duration (float, optional): `dataset.segment_duration`; shorter clips get padded (a warning).
        min_segment_ratio (float): `dataset.min_segment_ratio`, mentioned in the padding warning.
        fast (bool): Read headers only (skips silence, NaN/inf, clipping, truncation and content duplicates).
        info_fields_required (bool): `dataset.info_fields_required`: sidecars must hold every MusicInfo field.
        allow_missing_description (bool): Accept empty descriptions (unconditional training on purpose).
        base_dir (str or Path, optional): Folder relative paths are resolved against (default: cwd, like dora).
        workers (int, optional): Threads checking files (default: up to 4).
        allow_silence (bool): Accept mostly silent clips and long leading/trailing silence in every clip (they are
            then warnings). Per clip, `"allow_silence": true` in its sidecar does the same (`silence.py`).
    Returns:
        ValidationReport: errors, warnings, per-split summary.
    """
    expect = Expectations(sample_rate, channels, segment_duration, min_segment_ratio, not fast,
                          info_fields_required, allow_missing_description, allow_silence)
    report = ValidationReport(settings={'sample_rate': sample_rate, 'channels': channels,
                                        'segment_duration': segment_duration, 'decoded': not fast})
    entries: tp.List[_Entry] = []
    for split, split_path in datasource.items():
        if isinstance(split_path, (str, Path)):
            entries += _read_split(str(split), split_path, report, Path(base_dir) if base_dir else None)
    unique_paths = list(dict.fromkeys(str(entry.path) for entry in entries))
    num_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        checks = dict(zip(unique_paths, pool.map(lambda p: check_audio_file(Path(p), expect), unique_paths)))
    reported: tp.Set[str] = set()
    for entry in entries:
        check = checks[str(entry.path)]
        if check.duration is not None and check.usable:
            report.splits[entry.split].durations.append(check.duration)
        if str(entry.path) not in reported:
            reported.add(str(entry.path))
            for severity, code, message in check.problems:
                _add(report, severity, entry, code, message)
        if check.usable:
            _check_claims(report, entry, check)
    _check_short_clips(report, entries, checks, expect)
    _check_duplicates(report, entries, checks)
    return report


def validate_manifest(manifest: tp.Union[str, Path], split: str = 'train', **kwargs: tp.Any) -> ValidationReport:
    """`validate_datasource` for a single manifest (a data.jsonl(.gz) file or its folder)."""
    return validate_datasource({split: str(manifest)}, **kwargs)


def _read_split(split: str, split_path: tp.Union[str, Path], report: ValidationReport,
                base_dir: tp.Optional[Path]) -> tp.List[_Entry]:
    summary = report.splits.setdefault(split, SplitSummary(split))
    path = Path(split_path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        manifest = manifest_file(path)
    except DataError as exc:
        report.errors.append(DataIssue(split, str(path), None, 'missing_manifest', str(exc)))
        return []
    summary.manifest = str(manifest)
    try:
        lines = read_manifest(manifest)
    except DataError as exc:
        report.errors.append(DataIssue(split, str(manifest), None, 'unreadable_manifest', str(exc)))
        return []
    entries = []
    for item in lines:
        if item.meta is None:
            report.errors.append(DataIssue(
                split, str(manifest), item.line, 'bad_manifest_line',
                f"line {item.line} of {manifest}: {item.problem}. AudioCraft would crash on it when loading the "
                f"split. Fix: correct or delete that line (or re-run `audiocraft-lora prepare`).", str(manifest)))
            continue
        resolved = resolve_entry_path(item.meta.path, base_dir)
        entries.append(_Entry(split, str(manifest), item.line, item.meta.path, resolved,
                              float(item.meta.duration), int(item.meta.sample_rate)))
    summary.entries = len(entries)
    if not lines:
        report.errors.append(DataIssue(split, str(manifest), None, 'empty_split',
                                       f"manifest {manifest} is empty: AudioCraft asserts on an empty dataset. "
                                       f"Fix: re-run `audiocraft-lora prepare`.", str(manifest)))
    return entries


def _add(report: ValidationReport, severity: str, entry: _Entry, code: str, message: str) -> None:
    issue = DataIssue(entry.split, str(entry.path), entry.line, code, message, entry.manifest)
    (report.errors if severity == ERROR else report.warnings).append(issue)


def _check_claims(report: ValidationReport, entry: _Entry, check: FileCheck) -> None:
    """Manifest duration and sample rate against the file."""
    actual = check.duration or 0.0
    claimed = entry.duration
    fix = "Fix: re-run `audiocraft-lora prepare` to rewrite the manifest from the files."
    if claimed > ABSURD_SECONDS or (claimed > actual * ABSURD_RATIO and claimed - actual > 60):
        _add(report, ERROR, entry, 'absurd_duration',
             f"the manifest claims {claimed:.1f} s ({claimed / 3600:.1f} h) but the file lasts {actual:.2f} s: "
             f"AudioCraft samples files by claimed duration and would seek far past the end. {fix}")
    elif not check.truncated and abs(claimed - actual) > max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_RATIO * actual):
        _add(report, ERROR, entry, 'duration_mismatch',
             f"the manifest says {claimed:.2f} s but the file lasts {actual:.2f} s (the file changed after the "
             f"manifest was written?): crops past the real end fail or come back short. {fix}")
    if check.header is not None and entry.sample_rate != check.header.sample_rate:
        _add(report, WARNING, entry, 'manifest_sample_rate',
             f"the manifest says {entry.sample_rate} Hz but the file is {check.header.sample_rate} Hz (the file's "
             f"rate is what AudioCraft uses). {fix}")


def _check_short_clips(report: ValidationReport, entries: tp.List[_Entry], checks: tp.Dict[str, FileCheck],
                       expect: Expectations) -> None:
    segment = expect.segment_duration
    if not segment:
        return
    lengths = [check.duration for check in checks.values() if check.usable and check.duration]
    suggestion = suggest_segment_duration(lengths or [segment], cap=MAX_SEGMENT_SECONDS)
    warned: tp.Set[str] = set()
    for entry in entries:
        check = checks[str(entry.path)]
        if not check.usable or check.duration is None or check.duration >= segment - SHORT_CLIP_TOLERANCE_S \
                or check.path in warned:
            continue
        warned.add(check.path)
        padding = segment - check.duration
        advice = (f" Suggested: dataset.segment_duration={suggestion} (median clip length)."
                  if suggestion < segment else '')
        _add(report, WARNING, entry, 'short_clip',
             f"{check.duration:.1f} s, shorter than the {segment:g} s segment: it will be padded with {padding:.1f} s "
             f"of silence ({padding / segment:.0%} of the segment; min_segment_ratio={expect.min_segment_ratio:g}). "
             f"Padding is masked from the loss by default in audiocraft-lora, but the model still sees fewer real "
             f"frames.{advice}")


def _check_duplicates(report: ValidationReport, entries: tp.List[_Entry], checks: tp.Dict[str, FileCheck]) -> None:
    """The same file (or the same bytes under another name) in train and another split; repeats within a split."""
    train_by_real: tp.Dict[str, _Entry] = {}
    train_by_digest: tp.Dict[str, _Entry] = {}
    seen_in_split: tp.Set[tp.Tuple[str, str]] = set()
    for entry in entries:
        check = checks[str(entry.path)]
        key = (entry.split, check.realpath)
        if key in seen_in_split:
            _add(report, WARNING, entry, 'duplicate_in_split', f"listed more than once in {entry.split}: it is "
                                                               f"sampled proportionally more often.")
        seen_in_split.add(key)
        if entry.split == 'train':
            train_by_real.setdefault(check.realpath, entry)
            if check.digest:
                train_by_digest.setdefault(check.digest, entry)
    for entry in entries:
        if entry.split == 'train':
            continue
        check = checks[str(entry.path)]
        twin = train_by_real.get(check.realpath) or (train_by_digest.get(check.digest) if check.digest else None)
        if twin is not None:
            same = 'the same file' if twin.path == entry.path or checks[str(twin.path)].realpath == check.realpath \
                else f'identical audio ({twin.path})'
            _add(report, ERROR, entry, 'duplicate_across_splits',
                 f"{same} is also in train ({twin.manifest} line {twin.line}): validation would measure "
                 f"memorisation, not generalisation. Fix: remove it from one of the two splits (re-run prepare).")
