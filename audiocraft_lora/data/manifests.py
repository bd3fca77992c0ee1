"""AudioCraft manifests (`egs/<name>/<split>/data.jsonl`, one AudioMeta per line) and dset yaml files.

A manifest line is `AudioMeta.to_dict()`: path, duration, sample_rate, amplitude, weight, info_path. AudioCraft
resolves a relative path against the directory `dora run` is launched from (dora's `git_save.to_absolute_path`).
"""
from dataclasses import dataclass
import gzip
import json
import math
import os
from pathlib import Path
import re
import typing as tp

from audiocraft.data.audio_dataset import AudioMeta

from ..errors import DataError
from ..checkpoint_io import write_text_atomic

SPLITS = ('train', 'valid', 'evaluate', 'generate')
MANIFEST_NAMES = ('data.jsonl', 'data.jsonl.gz')
DSET_MAX_SAMPLE_RATE = 48000
DSET_MAX_CHANNELS = 2


@dataclass
class ManifestLine:
    """One line of a manifest: either a parsed `meta` or the `problem` that stops AudioCraft from parsing it.

    Attributes:
        line (int): 1-based line number.
        meta (AudioMeta, optional): The entry, with its path as written (not resolved).
        problem (str, optional): Why the line is unusable.
    """
    line: int
    meta: tp.Optional[AudioMeta] = None
    problem: tp.Optional[str] = None


def manifest_file(split_path: tp.Union[str, Path]) -> Path:
    """The manifest file of a split: the path itself, or `data.jsonl(.gz)` inside a folder (as AudioCraft does).

    Raises:
        DataError: Neither exists.
    """
    path = Path(split_path)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path} has no data.jsonl or data.jsonl.gz. Fix: create the dataset with "
                        f"`audiocraft-lora prepare`, or point the split at the right folder.")
    if path.is_file():
        return path
    raise DataError(f"manifest {path} does not exist (cwd: {os.getcwd()}). Fix: create it with "
                    f"`audiocraft-lora prepare`, or fix the path in the dset yaml.")


def manifest_entry(path: tp.Union[str, Path], duration: float, sample_rate: int,
                   relative_to: tp.Optional[Path] = None) -> AudioMeta:
    """An AudioMeta with an absolute path, or a path relative to `relative_to` when given.

    Paths are made absolute without resolving symlinks: a mirrored symlink must stay the path AudioCraft opens, so
    that its sidecar (next to the link) is found.
    """
    return AudioMeta(path=written_path(path, relative_to), duration=float(duration), sample_rate=int(sample_rate))


def written_path(path: tp.Union[str, Path], relative_to: tp.Optional[tp.Union[str, Path]] = None) -> str:
    """`path` as a manifest or dset yaml holds it: absolute, or relative to `relative_to` (the folder `dora run`
    will be launched from) when given. Symlinks are kept (a mirrored clip's sidecar sits next to the link)."""
    absolute = os.path.abspath(str(path))
    return os.path.relpath(absolute, os.path.abspath(str(relative_to))) if relative_to is not None else absolute


def write_manifest(split_dir: tp.Union[str, Path], metas: tp.Sequence[AudioMeta]) -> Path:
    """Write `<split_dir>/data.jsonl` atomically (same json as AudioCraft's `save_audio_meta`)."""
    text = ''.join(json.dumps(meta.to_dict()) + '\n' for meta in metas)
    return write_text_atomic(Path(split_dir) / 'data.jsonl', text)


def read_manifest(path: tp.Union[str, Path]) -> tp.List[ManifestLine]:
    """Parse a manifest line by line, turning each unusable line into a `problem` instead of raising.

    Raises:
        DataError: The file itself can't be read (permission, broken gzip).
    """
    path = Path(path)
    opener = gzip.open if str(path).lower().endswith('.gz') else open
    try:
        with opener(path, 'rb') as handle:  # type: ignore[operator]
            raw_lines = handle.readlines()
    except (OSError, EOFError) as exc:
        raise DataError(f"manifest {path} can't be read ({exc}). Fix: check its permissions, or re-create it "
                        f"with `audiocraft-lora prepare`.") from exc
    return [_parse_line(number, raw) for number, raw in enumerate(raw_lines, start=1)]


def resolve_entry_path(entry_path: str, base_dir: tp.Optional[Path] = None) -> Path:
    """The file AudioCraft will open for a manifest path: relative ones against `base_dir` (default: cwd)."""
    path = Path(entry_path)
    if path.is_absolute():
        return path
    return Path(os.path.abspath(os.path.join(str(base_dir or os.getcwd()), entry_path)))


def write_dset_yaml(config_root: tp.Union[str, Path], name: str, split_dirs: tp.Mapping[str, tp.Union[str, Path]],
                    max_sample_rate: int = DSET_MAX_SAMPLE_RATE, max_channels: int = DSET_MAX_CHANNELS) -> Path:
    """Write `<config_root>/dset/audio/<name>.yaml` in AudioCraft's format, with all four splits."""
    missing = [split for split in SPLITS if split not in split_dirs]
    if missing:
        raise ValueError(f"write_dset_yaml needs all of {SPLITS}; missing {missing}")
    lines = ['# @package __global__', '', 'datasource:',
             f'  max_sample_rate: {max_sample_rate}', f'  max_channels: {max_channels}', '']
    lines += [f'  {split}: {_yaml_scalar(str(split_dirs[split]))}' for split in SPLITS]
    path = Path(config_root) / 'dset' / 'audio' / f'{name}.yaml'
    return write_text_atomic(path, '\n'.join(lines) + '\n')


def dset_yaml_path(config_root: tp.Union[str, Path], dset: str) -> Path:
    """`config/dset/<dset>.yaml` for a dset name such as `audio/mystyle` (a `dset=` prefix is accepted)."""
    dset = dset.split('=', 1)[1] if dset.startswith('dset=') else dset
    return Path(config_root) / 'dset' / f'{dset}.yaml'


def load_datasource(config_root: tp.Union[str, Path], dset: str) -> tp.Dict[str, str]:
    """The split -> manifest path mapping of a dset yaml (`datasource` keys whose value is a path).

    Raises:
        DataError: The yaml is missing, unreadable or has no datasource paths.
    """
    from omegaconf import OmegaConf

    path = dset_yaml_path(config_root, dset)
    if not path.is_file():
        raise DataError(f"dset config {path} does not exist. Fix: create it with `audiocraft-lora prepare "
                        f"<audio folder or metadata.json> --name {Path(dset).name}`, or pass --config-root.")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # noqa: BLE001 - yaml/omegaconf errors become one readable message.
        raise DataError(f"dset config {path} is not valid yaml ({exc}). Fix the file or re-run prepare.") from exc
    datasource = cfg.get('datasource') if isinstance(cfg, dict) else None
    paths = {key: value for key, value in (datasource or {}).items() if isinstance(value, str)}
    if not paths:
        raise DataError(f"dset config {path} has no `datasource:` split paths (train/valid/evaluate/generate). "
                        f"Fix: re-create it with `audiocraft-lora prepare`.")
    return paths


def _yaml_scalar(text: str) -> str:
    """A plain yaml scalar for simple paths, a double-quoted (JSON-escaped, valid yaml) one otherwise."""
    return text if re.fullmatch(r'[A-Za-z0-9_./~+-]+', text) and not text.startswith('~') else json.dumps(text)


def _parse_line(number: int, raw: bytes) -> ManifestLine:
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        shown = raw.decode('utf-8', 'replace').strip()[:80]
        return ManifestLine(number, problem=f"not valid JSON ({exc}): {shown!r}")
    if not isinstance(record, dict):
        return ManifestLine(number, problem=f"expected a JSON object, got {type(record).__name__}")
    problem = _field_problem(record)
    if problem:
        return ManifestLine(number, problem=problem)
    try:
        meta = AudioMeta.from_dict(record)
    except Exception as exc:  # noqa: BLE001 - any construction failure is a bad line.
        return ManifestLine(number, problem=f"not an AudioMeta ({exc})")
    return ManifestLine(number, meta=meta)


def _field_problem(record: tp.Mapping[str, tp.Any]) -> tp.Optional[str]:
    missing = [key for key in ('path', 'duration', 'sample_rate') if key not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)} (AudioMeta needs path, duration, sample_rate)"
    if not isinstance(record['path'], str) or not record['path'].strip():
        return "`path` must be a non-empty string"
    duration = record['duration']
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration):
        return f"`duration` must be a finite number of seconds, got {duration!r}"
    if duration <= 0:
        return f"`duration` must be > 0 seconds, got {duration!r}"
    sample_rate = record['sample_rate']
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        return f"`sample_rate` must be a positive integer, got {sample_rate!r}"
    weight = record.get('weight')
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
        return f"`weight` must be null or a number >= 0, got {weight!r}"
    return None
