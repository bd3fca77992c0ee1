"""Prompt lists for `generate` and `compare`: from the command line or a json file.

A prompts file is json, one of:

    ["hip hop 808 beat with trap drums", "trap hiphop beat, 808 sub bass heavy"]
    [{"description": "hip hop 808 beat", "name": "808", "duration": 10}, {"prompt": "lofi trap"}]
    {"prompts": [...either of the above...]}

Objects need a non-empty `description` (or `prompt`, or `text`) string; `name` (file stem) and `duration`
(seconds, > 0) are optional. Unknown keys are an error (a typo like `durtion` would otherwise be ignored silently).
"""
from dataclasses import dataclass
import json
import math
from pathlib import Path
import re
import typing as tp

from .errors import UserError

TEXT_KEYS = ('description', 'prompt', 'text')
OPTIONAL_KEYS = ('name', 'duration')


@dataclass(frozen=True)
class Prompt:
    text: str
    name: str
    duration: float


def slugify(text: str, max_len: int = 40) -> str:
    slug = re.sub(r'[^\w]+', '_', text.lower(), flags=re.UNICODE).strip('_')
    return slug[:max_len].rstrip('_') or 'prompt'


def check_duration(value: tp.Any, where: str) -> float:
    try:
        duration = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: duration must be a number of seconds, got {value!r}.") from None
    if not math.isfinite(duration) or duration <= 0:
        raise UserError(f"{where}: duration must be > 0 seconds, got {value!r}.")
    return duration


def load_prompts(texts: tp.Optional[tp.Sequence[str]] = None, prompts_file: tp.Optional[tp.Union[str, Path]] = None,
                 duration: float = 15.0) -> tp.List[Prompt]:
    """Prompts from `texts` and/or `prompts_file`, in order, each with a unique file-safe name.

    Raises:
        UserError: no prompt at all, unreadable/invalid file (naming the file and the entry), bad duration,
            duplicate names.
    """
    duration = check_duration(duration, '--duration')
    entries: tp.List[tp.Tuple[str, tp.Optional[str], float]] = []
    for i, text in enumerate(texts or []):
        if not str(text).strip():
            raise UserError(f"--prompts: prompt {i + 1} is empty.")
        entries.append((str(text).strip(), None, duration))
    if prompts_file is not None:
        entries.extend(_read_file(Path(prompts_file), duration))
    if not entries:
        raise UserError("No prompts: pass --prompts \"a trap beat\" ... or --prompts-file prompts.json.")
    prompts, seen = [], set()
    for i, (text, name, dur) in enumerate(entries):
        stem = slugify(name) if name else f'{i:02d}_{slugify(text)}'
        if stem in seen:
            raise UserError(f"Two prompts share the name {stem!r}: give each a unique `name`.")
        seen.add(stem)
        prompts.append(Prompt(text=text, name=stem, duration=dur))
    return prompts


def _read_file(path: Path, duration: float) -> tp.List[tp.Tuple[str, tp.Optional[str], float]]:
    if not path.is_file():
        raise UserError(f"Prompts file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"Prompts file {path} is not valid JSON: {exc}.") from exc
    if isinstance(data, dict) and set(data) == {'prompts'}:
        data = data['prompts']
    if not isinstance(data, list) or not data:
        raise UserError(f"Prompts file {path}: expected a non-empty JSON list of strings or of objects with a "
                        "'description' field (or {\"prompts\": [...]}), got "
                        f"{type(data).__name__ if data or data == [] else data!r}.")
    entries = []
    for i, item in enumerate(data):
        where = f"{path} entry {i}"
        if isinstance(item, str):
            if not item.strip():
                raise UserError(f"{where}: empty prompt.")
            entries.append((item.strip(), None, duration))
            continue
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a string or an object with 'description', got "
                            f"{type(item).__name__} {item!r}.")
        text_keys = [k for k in TEXT_KEYS if k in item]
        if len(text_keys) != 1 or not isinstance(item[text_keys[0]], str) or not item[text_keys[0]].strip():
            raise UserError(f"{where}: needs exactly one non-empty text field among {list(TEXT_KEYS)}, got "
                            f"{sorted(item)}.")
        unknown = sorted(set(item) - set(TEXT_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown}; allowed: one of {list(TEXT_KEYS)}, "
                            f"{list(OPTIONAL_KEYS)}.")
        name = item.get('name')
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise UserError(f"{where}: 'name' must be a non-empty string.")
        dur = check_duration(item['duration'], where) if 'duration' in item else duration
        entries.append((item[text_keys[0]].strip(), name, dur))
    return entries
