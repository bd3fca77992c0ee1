"""Find the clips of a user dataset and their captions: a folder of audio files, or a `metadata.json`.

Folder: every audio file below it (nested folders, any name), captioned by a sibling `<stem>.txt` (the text) or
`<stem>.json` (an object with description/caption/prompt/text and optional MusicInfo fields such as genre, bpm).

metadata.json: a JSON list of records, or {"train": [...], "valid": [...]} (a `.jsonl` file with one record per
line works too). A record names its audio with one of `AUDIO_FIELD_ALIASES` (relative paths are relative to the
metadata file), its text with one of description/caption/prompt/text, optionally a `split`, and any MusicInfo field.
"""
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import typing as tp

from ..errors import DataError
from .audio_files import is_audio_file
from .sidecars import TEXT_FIELD_ALIASES, caption_from_record, normalize_music_info, sidecar_path_for

# (audio_filepath: NeMo-style manifests; file_name: Hugging Face audiofolder metadata)
AUDIO_FIELD_ALIASES = ('path', 'audio', 'audio_path', 'audio_filepath', 'file', 'filename', 'file_name')
SPLIT_ALIASES = {'train': 'train', 'training': 'train',
                 'valid': 'valid', 'validation': 'valid', 'val': 'valid', 'dev': 'valid', 'test': 'valid',
                 'eval': 'valid', 'evaluate': 'valid', 'evaluation': 'valid'}


@dataclass
class SourceClip:
    """One input audio file and what we know about it.

    Attributes:
        audio_path (Path): Absolute path (symlinks kept as given).
        relative_name (Path): Its path below the dataset root, used to name mirrored or converted files.
        info (dict): Every MusicInfo field (see `sidecars.normalize_music_info`).
        split (str, optional): 'train' or 'valid' when the metadata says so.
        origin (str): Where it was listed, for messages ("metadata.json record 3", or the audio path).
    """
    audio_path: Path
    relative_name: Path
    info: tp.Dict[str, tp.Any]
    split: tp.Optional[str] = None
    origin: str = ''

    @property
    def has_caption(self) -> bool:
        return bool(self.info.get('description'))


@dataclass
class CollectedSources:
    """Clips found, plus problems: `errors` (clips that can't be used) and `warnings`."""
    clips: tp.List[SourceClip] = field(default_factory=list)
    errors: tp.List[str] = field(default_factory=list)
    warnings: tp.List[str] = field(default_factory=list)


def collect_clips(source: tp.Union[str, Path], description: tp.Optional[str] = None,
                  exclude: tp.Sequence[Path] = ()) -> CollectedSources:
    """Clips from a folder of audio files or a metadata file.

    Args:
        source (str or Path): Folder, or a `.json` / `.jsonl` metadata file.
        description (str, optional): Caption for clips that have none of their own.
        exclude (sequence of Path): Folders never scanned (our own outputs when they live inside `source`).
    Raises:
        DataError: The source doesn't exist or the metadata file can't be understood.
    """
    source = Path(source)
    if source.is_dir():
        collected = collect_folder_clips(source, exclude)
    elif source.is_file() and source.suffix.lower() in ('.json', '.jsonl'):
        collected = collect_metadata_clips(source)
    elif source.is_file():
        raise DataError(f"{source} is neither a folder of audio files nor a metadata .json/.jsonl file. "
                        f"Fix: pass the folder that holds the audio, or your metadata.json.")
    else:
        raise DataError(f"{source} does not exist. Fix: pass a folder of audio files or a metadata.json.")
    if description:
        for clip in collected.clips:
            if not clip.has_caption:
                clip.info['description'] = description.strip()
    return collected


def collect_folder_clips(folder: Path, exclude: tp.Sequence[Path] = ()) -> CollectedSources:
    """Every audio file below `folder` (sorted, hidden entries skipped), captioned by sibling .txt/.json files."""
    collected = CollectedSources()
    root = Path(os.path.abspath(folder))
    excluded = {os.path.abspath(path) for path in exclude}
    for current, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and os.path.join(current, d) not in excluded)
        for name in sorted(files):
            audio_path = Path(current) / name
            if name.startswith('.') or not is_audio_file(audio_path):
                continue
            record, warning = _caption_record(audio_path)
            if warning:
                collected.warnings.append(warning)
            collected.clips.append(SourceClip(audio_path, audio_path.relative_to(root),
                                              normalize_music_info(record), None, str(audio_path)))
    if not collected.clips:
        raise DataError(f"no audio files (.wav, .mp3, .flac, .ogg, .m4a) found under {folder}. "
                        f"Fix: pass the folder that holds your clips.")
    return collected


def collect_metadata_clips(metadata_path: Path) -> CollectedSources:
    """Clips listed by a metadata file (see the module docstring for the accepted layouts).

    The same problem in many records (a whole file written with another tool's key names) is reported once, with
    the records it concerns, so the user sees the fix instead of a hundred identical lines.
    """
    collected = CollectedSources()
    base = Path(os.path.abspath(metadata_path)).parent
    problems: tp.Dict[str, tp.List[str]] = {}
    for where, record, split in _metadata_records(metadata_path):
        clip, problem = _record_clip(record, split, base, f"{metadata_path} {where}")
        if problem:
            problems.setdefault(problem, []).append(where)
        else:
            collected.clips.append(clip)
    collected.errors += [_grouped_problem(metadata_path, wheres, problem) for problem, wheres in problems.items()]
    if not collected.clips and not collected.errors:
        raise DataError(f"{metadata_path} lists no clips. Fix: add records with an audio path and a description.")
    return collected


def _record_clip(record: tp.Any, split: tp.Optional[str], base: Path,
                 origin: str) -> tp.Tuple[tp.Optional[SourceClip], tp.Optional[str]]:
    """The clip of one metadata record, or why it can't be used (a message without the record's position)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}."
    audio_field = next((key for key in AUDIO_FIELD_ALIASES if isinstance(record.get(key), str)), None)
    if audio_field is None:
        return None, (f"no audio path: the record's keys are {', '.join(sorted(map(str, record))) or 'none'}. Fix: "
                      f"name the audio file with one of the keys {', '.join(AUDIO_FIELD_ALIASES)}.")
    caption_problem = _caption_problem(record)
    if caption_problem:
        return None, caption_problem
    record_split = record.get('split', split)
    if record_split is not None:
        if str(record_split).lower() not in SPLIT_ALIASES:
            return None, (f"unknown split {record_split!r}. Fix: use one of train, valid "
                          f"(aliases: {', '.join(sorted(SPLIT_ALIASES))}).")
        record_split = SPLIT_ALIASES[str(record_split).lower()]
    audio_path = Path(os.path.abspath(base / record[audio_field]))
    if not audio_path.is_file():
        what = 'a folder' if audio_path.is_dir() else 'missing'
        return None, (f"audio file {audio_path} is {what} (relative paths are relative to {base}). "
                      f"Fix: correct `{audio_field}` or remove the record.")
    try:
        relative_name = audio_path.relative_to(base)
    except ValueError:
        relative_name = Path('external') / audio_path.name
    return SourceClip(audio_path, relative_name, normalize_music_info(record), record_split, origin), None


def _caption_problem(record: tp.Mapping[str, tp.Any]) -> tp.Optional[str]:
    """A caption field that is there but is no usable text ("description": 5, or ""), unless another one is."""
    if caption_from_record(record) is not None:
        return None
    given = [key for key in TEXT_FIELD_ALIASES if key in record and record[key] is not None]
    if not given:
        return None  # no caption at all: --description may fill it, validation names it otherwise
    key, value = given[0], record[given[0]]
    what = 'empty' if isinstance(value, str) else f"a JSON {type(value).__name__} ({value!r}), not text"
    return (f"\"{key}\" is {what}: AudioCraft would train the clip with no caption. Fix: write the caption as a "
            f"non-empty string (e.g. \"{key}\": \"trap beat, 808 bass\"), or remove the record.")


def _grouped_problem(metadata_path: Path, wheres: tp.List[str], problem: str) -> str:
    if len(wheres) == 1:
        return f"{metadata_path} {wheres[0]}: {problem}"
    shown = ', '.join(wheres[:5]) + (f" and {len(wheres) - 5} more" if len(wheres) > 5 else '')
    return f"{metadata_path}: {len(wheres)} records ({shown}): {problem}"


def _metadata_records(path: Path) -> tp.Iterator[tp.Tuple[str, tp.Any, tp.Optional[str]]]:
    """(position in the file, record, split from the layout) for each record of a metadata file."""
    try:
        text = path.read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"can't read metadata {path} ({exc}). Fix: save it as UTF-8 JSON.") from exc
    if path.suffix.lower() == '.jsonl':
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield f"line {number}", _loads(line, path, number), None
        return
    data = _loads(text, path, None)
    if isinstance(data, list):
        for index, record in enumerate(data):
            yield f"record {index}", record, None
        return
    if isinstance(data, dict):
        unknown = [key for key in data if key.lower() not in SPLIT_ALIASES]
        if unknown or not data:
            raise DataError(f"{path}: a metadata object must map splits to lists, like {{\"train\": [...], "
                            f"\"valid\": [...]}}; unexpected keys {unknown}. Fix: use that layout or a plain list.")
        for key, records in data.items():
            if not isinstance(records, list):
                raise DataError(f"{path}: \"{key}\" must be a list of records, got {type(records).__name__}.")
            for index, record in enumerate(records):
                yield f"{key}[{index}]", record, SPLIT_ALIASES[key.lower()]
        return
    raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of records or "
                    f"{{\"train\": [...], \"valid\": [...]}}.")


def _loads(text: str, path: Path, line: tp.Optional[int]) -> tp.Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        where = f"{path} line {line}" if line is not None else str(path)
        raise DataError(f"{where} is not valid JSON ({exc}). Fix the file (a JSON validator shows the spot).") from exc


def _caption_record(audio_path: Path) -> tp.Tuple[tp.Dict[str, tp.Any], tp.Optional[str]]:
    """Caption fields for one audio file from `<stem>.json` and/or `<stem>.txt`, and a warning if one is broken."""
    record: tp.Dict[str, tp.Any] = {}
    warning = None
    json_path = sidecar_path_for(audio_path)
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text(encoding='utf-8-sig'))
            if isinstance(data, dict):
                record.update(data)
            else:
                warning = f"{json_path} is not a JSON object; ignored as a caption."
        except (OSError, ValueError) as exc:
            warning = f"{json_path} can't be read as JSON ({exc}); ignored as a caption."
    text_path = audio_path.with_suffix('.txt')
    if text_path.is_file() and not any(isinstance(record.get(k), str) and record[k].strip()
                                       for k in ('description', 'caption', 'prompt', 'text')):
        try:
            record['description'] = text_path.read_text(encoding='utf-8-sig').strip()
        except (OSError, UnicodeDecodeError) as exc:
            warning = f"{text_path} can't be read as UTF-8 text ({exc}); ignored as a caption."
    return record, warning
