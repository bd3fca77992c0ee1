"""The MusicInfo sidecar: `<stem>.json` next to each audio file, read by AudioCraft's `MusicDataset`.

`MusicDataset` looks for `Path(meta.path).with_suffix('.json')`. When it is missing, the clip is silently trained
with no text; with `info_fields_required=True` (AudioCraft's default) a sidecar missing any MusicInfo field raises
a KeyError in the middle of training. We therefore always write every field, and `validate` checks them up front.
"""
from dataclasses import fields
import json
import math
from pathlib import Path
import re
import typing as tp

from audiocraft.data.audio_dataset import AudioMeta
from audiocraft.data.info_audio_dataset import AudioInfo
from audiocraft.data.music_dataset import MusicInfo

from ..checkpoint_io import write_text_atomic
from .silence import ALLOW_SILENCE_KEY

TEXT_FIELD_ALIASES = ('description', 'caption', 'prompt', 'text')
LIST_FIELDS = ('moods', 'keywords')
_RUNTIME_FIELDS = {f.name for f in fields(AudioInfo)} | {'self_wav', 'joint_embed'}
# title, artist, key, bpm, genre, moods, keywords, description, name, instrument (in MusicInfo's order).
MUSIC_INFO_FIELDS: tp.Tuple[str, ...] = tuple(f.name for f in fields(MusicInfo) if f.name not in _RUNTIME_FIELDS)
# MusicInfo.from_dict(fields_required=True) tolerates only these missing.
OPTIONAL_MUSIC_INFO_FIELDS = ('keywords',)


def sidecar_path_for(audio_path: tp.Union[str, Path]) -> Path:
    """Where AudioCraft's MusicDataset looks for the metadata of `audio_path`."""
    return Path(audio_path).with_suffix('.json')


def caption_from_record(record: tp.Mapping[str, tp.Any]) -> tp.Optional[str]:
    """The text of a record, from the first non-empty field among `TEXT_FIELD_ALIASES`."""
    for key in TEXT_FIELD_ALIASES:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def normalize_music_info(record: tp.Mapping[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Every MusicInfo field from a loose user record (missing ones are None), and `allow_silence` when it is true.

    The description comes from description/caption/prompt/text; moods and keywords become lists of strings
    (a comma-separated string is split); bpm becomes a float ("140 bpm" -> 140.0) or None.
    """
    info: tp.Dict[str, tp.Any] = {name: None for name in MUSIC_INFO_FIELDS}
    for name in MUSIC_INFO_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if name in LIST_FIELDS:
            info[name] = _as_string_list(value)
        elif name == 'bpm':
            info[name] = _as_bpm(value)
        elif isinstance(value, (str, int, float)):
            info[name] = str(value).strip() or None
    info['description'] = caption_from_record(record)
    if record.get(ALLOW_SILENCE_KEY) is True:  # (the user's own per-clip choice travels with the clip)
        info[ALLOW_SILENCE_KEY] = True
    return info


def write_sidecar(path: tp.Union[str, Path], info: tp.Mapping[str, tp.Any]) -> Path:
    """Write a sidecar atomically, keeping unknown keys of an existing valid one.

    Use it only for sidecars of our own outputs (mirrors, converted copies) or after `sidecar_conflict` said the
    user's file is safe to update. The json is ASCII-only (non-ASCII text is escaped) because `MusicDataset` opens
    it with the locale's encoding.
    """
    path = Path(path)
    existing, _ = read_sidecar(path)
    data: tp.Dict[str, tp.Any] = dict(existing or {})
    data.update(_written_fields(info))
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + '\n')


def read_sidecar(path: tp.Union[str, Path]) -> tp.Tuple[tp.Optional[tp.Dict[str, tp.Any]], tp.Optional[str]]:
    """(the JSON object, None), (None, why it is unusable), or (None, None) when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding='utf-8-sig'))
    except (OSError, ValueError) as exc:
        return None, f"it can't be read as JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"it holds a JSON {type(data).__name__}, not an object"
    return data, None


def sidecar_conflict(path: tp.Union[str, Path], info: tp.Mapping[str, tp.Any]) -> tp.Optional[str]:
    """Why writing `info` over the existing sidecar would destroy something the user wrote; None when it is safe.

    Safe: no file, or a JSON object whose non-null fields already hold the values we would write (we only fill in
    missing/null fields and keep every other key). Not safe: an unreadable file, or any value that would change
    (another dataset prepared from the same audio, or the user's own sidecar in another format, e.g. "bpm": "85").
    """
    existing, problem = read_sidecar(path)
    if problem:
        return problem
    if existing is None:
        return None
    changed = [f"{name} {existing[name]!r} -> {value!r}" for name, value in _written_fields(info).items()
               if existing.get(name) is not None and existing[name] != value]
    return f"writing it would change {'; '.join(changed)}" if changed else None


def sidecar_unchanged(path: tp.Union[str, Path], info: tp.Mapping[str, tp.Any]) -> bool:
    """The sidecar already holds every field we would write (so it needn't be rewritten)."""
    existing, _ = read_sidecar(path)
    return existing is not None and all(name in existing and existing[name] == value
                                        for name, value in _written_fields(info).items())


def backup_sidecar(path: tp.Union[str, Path]) -> Path:
    """Copy `path` to the first free `<name>.bak`, `<name>.bak1`, ... before it is replaced; returns the copy."""
    path = Path(path)
    backup, number = path.with_name(path.name + '.bak'), 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.bak{number}")
        number += 1
    backup.write_bytes(path.read_bytes())
    return backup


def sidecar_allows_silence(audio_path: tp.Union[str, Path]) -> bool:
    """`"allow_silence": true` in the clip's sidecar: its silence is intended (see `silence.py`)."""
    data, _ = read_sidecar(sidecar_path_for(audio_path))
    return bool(data and data.get(ALLOW_SILENCE_KEY) is True)


def _written_fields(info: tp.Mapping[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Every MusicInfo field, plus `allow_silence` when `info` sets it."""
    fields_ = {name: info.get(name) for name in MUSIC_INFO_FIELDS}
    if info.get(ALLOW_SILENCE_KEY) is not None:
        fields_[ALLOW_SILENCE_KEY] = info[ALLOW_SILENCE_KEY]
    return fields_


def sidecar_problems(audio_path: tp.Union[str, Path], info_fields_required: bool = True,
                     allow_missing_description: bool = False) -> tp.List[tp.Tuple[str, str]]:
    """What's wrong with the sidecar of one audio file, as (code, message) pairs; empty when it is fine.

    Args:
        audio_path (str or Path): The audio path exactly as the manifest gives it.
        info_fields_required (bool): The dataset's `info_fields_required` (AudioCraft's default is True).
        allow_missing_description (bool): Accept an empty description (unconditional training on purpose).
    """
    path = sidecar_path_for(audio_path)
    fix_all = "run `audiocraft-lora prepare` again, or write it by hand with every MusicInfo field"
    if not path.exists():
        return [('missing_sidecar', f"no sidecar {path}: AudioCraft would silently train this clip with no text. "
                                    f"Fix: {fix_all} ({', '.join(MUSIC_INFO_FIELDS)}).")]
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except PermissionError:
        return [('invalid_sidecar', f"sidecar {path} is not readable (permission denied). Fix: chmod a+r it.")]
    except (OSError, UnicodeDecodeError) as exc:
        return [('invalid_sidecar', f"sidecar {path} can't be read ({exc}). Fix: {fix_all}.")]
    except ValueError as exc:
        return [('invalid_sidecar', f"sidecar {path} is not valid JSON ({exc}). Fix: {fix_all}.")]
    if not isinstance(data, dict):
        return [('invalid_sidecar', f"sidecar {path} holds a JSON {type(data).__name__}, not an object. "
                                    f"Fix: {fix_all}.")]
    problems: tp.List[tp.Tuple[str, str]] = []
    missing = [name for name in MUSIC_INFO_FIELDS if name not in data and name not in OPTIONAL_MUSIC_INFO_FIELDS]
    if missing and info_fields_required:
        problems.append(('sidecar_missing_fields',
                         f"sidecar {path} lacks {', '.join(missing)}: MusicDataset(info_fields_required=True) raises "
                         f"KeyError on it during training. Fix: {fix_all} (null is fine for unknown values)."))
    try:  # what MusicDataset.__getitem__ does: the sidecar updated with the segment's info, then parsed.
        runtime = {'meta': AudioMeta(str(audio_path), 1.0, 32000), 'seek_time': 0.0, 'n_frames': 1,
                   'total_frames': 1, 'sample_rate': 32000, 'channels': 1}
        MusicInfo.from_dict({**data, **runtime}, fields_required=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported, never raised.
        problems.append(('invalid_sidecar', f"sidecar {path} can't be parsed by MusicInfo ({exc}). Fix: {fix_all}."))
    description = data.get('description')
    if not allow_missing_description and not (isinstance(description, str) and description.strip()):
        problems.append(('empty_description',
                         f"sidecar {path} has an empty description: AudioCraft would train this clip with no text. "
                         f"Fix: put a caption in its \"description\" (or pass a .txt caption / --description to "
                         f"`audiocraft-lora prepare`)."))
    return problems


def _as_string_list(value: tp.Any) -> tp.Optional[tp.List[str]]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(',')]
    elif isinstance(value, (list, tuple)):
        items = [str(part).strip() for part in value if part is not None]
    else:
        items = [str(value).strip()]
    items = [item for item in items if item]
    return items or None


def _as_bpm(value: tp.Any) -> tp.Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value > 0 else None
    match = re.search(r'\d+(\.\d+)?', str(value))
    return float(match.group(0)) if match else None
