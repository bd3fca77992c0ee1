"""Helpers for the data tests: synthetic audio, sidecars and manifests written with soundfile/json."""
import json
from pathlib import Path
import typing as tp

import numpy as np
import soundfile

MUSIC_INFO_KEYS = ('title', 'artist', 'key', 'bpm', 'genre', 'moods', 'keywords', 'description', 'name',
                   'instrument')


def write_tone(path: Path, seconds: float = 1.0, sample_rate: int = 32000, channels: int = 1,
               frequency: float = 220.0, amplitude: float = 0.3, subtype: tp.Optional[str] = None,
               samples: tp.Optional[np.ndarray] = None) -> Path:
    """Write a sine (or the given [T, C] samples) with soundfile; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples is None:
        t = np.arange(int(round(seconds * sample_rate))) / sample_rate
        mono = amplitude * np.sin(2 * np.pi * frequency * t)
        samples = np.stack([mono * (1 - 0.1 * c) for c in range(channels)], axis=1)
    soundfile.write(str(path), samples, sample_rate, subtype=subtype)
    return path


def write_sidecar(audio: Path, description: tp.Optional[str] = 'a test tone', **fields: tp.Any) -> Path:
    """A complete MusicInfo sidecar next to `audio`."""
    data = {key: None for key in MUSIC_INFO_KEYS}
    data.update(description=description, **fields)
    path = audio.with_suffix('.json')
    path.write_text(json.dumps(data))
    return path


def write_manifest(path: Path, entries: tp.Sequence[tp.Union[dict, str]]) -> Path:
    """A data.jsonl; dict entries are dumped, strings written as raw lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [entry if isinstance(entry, str) else json.dumps(entry) for entry in entries]
    path.write_text(''.join(line + '\n' for line in lines))
    return path


def entry(path: Path, duration: float, sample_rate: int = 32000) -> dict:
    return {'path': str(path), 'duration': duration, 'sample_rate': sample_rate, 'amplitude': None, 'weight': None,
            'info_path': None}
