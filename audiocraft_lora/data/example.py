"""A tiny deterministic demo dataset: 12 synthesized beats (kick, snare, hats, 808-style bass) with captions.

Used by the offline demo job and tests. Each clip is 3-4 s of 32 kHz mono 16-bit FLAC with a full MusicInfo
sidecar; the whole set is well under 1.5 MB.

Example:
    make_example_dataset(Path('egs/example'), Path('egs/example/audio'), relative_to=Path('.'))
"""
import math
from pathlib import Path
import typing as tp

import numpy as np
import torch

from .audio_files import write_audio
from .manifests import SPLITS, manifest_entry, write_manifest
from .sidecars import normalize_music_info, sidecar_path_for, write_sidecar

SAMPLE_RATE = 32000

# (description, genre, bpm, key, moods, instrument); the first 8 are train, then 2 valid, then 2 evaluate.
EXAMPLE_CLIPS: tp.Tuple[tp.Tuple[str, str, int, str, tp.List[str], str], ...] = (
    ("trap beat with 808 bass, 140 bpm", "trap", 140, "F minor", ["dark", "energetic"], "808"),
    ("boom bap hip hop drums with a warm bassline, 90 bpm", "hip hop", 90, "A minor", ["groovy"], "drums"),
    ("lofi hip hop beat, mellow and dusty, 80 bpm", "lofi", 80, "D minor", ["chill", "relaxed"], "drums"),
    ("four on the floor house beat with a plucky bass, 124 bpm", "house", 124, "G minor", ["uplifting"], "bass"),
    ("dark trap beat with heavy 808 sub bass, 150 bpm", "trap", 150, "C minor", ["dark", "aggressive"], "808"),
    ("minimal techno loop with a deep kick, 130 bpm", "techno", 130, "E minor", ["hypnotic"], "drums"),
    ("slow reggaeton dembow rhythm, 95 bpm", "reggaeton", 95, "B minor", ["sensual"], "drums"),
    ("fast drum and bass break with rolling sub, 172 bpm", "drum and bass", 172, "F# minor", ["energetic"], "drums"),
    ("hip hop 808 beat with trap drums, 145 bpm", "trap", 145, "G# minor", ["confident"], "808"),
    ("chill trap hi-hats and soft 808, 70 bpm", "trap", 70, "D# minor", ["chill"], "808"),
    ("uk garage shuffle beat with swung hats, 132 bpm", "uk garage", 132, "A# minor", ["bouncy"], "drums"),
    ("drill beat with sliding 808 bass, 142 bpm", "drill", 142, "C# minor", ["dark", "tense"], "808"),
)
SPLIT_SLICES = {'train': slice(0, 8), 'valid': slice(8, 10), 'evaluate': slice(10, 12), 'generate': slice(8, 10)}
_NOTE_HZ = {'C': 32.70, 'C#': 34.65, 'D': 36.71, 'D#': 38.89, 'E': 41.20, 'F': 43.65, 'F#': 46.25, 'G': 49.00,
            'G#': 51.91, 'A': 55.00, 'A#': 58.27, 'B': 61.74}


def synthesize_beat(bpm: float, root_hz: float, duration: float, rng: np.random.Generator,
                    sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A one-bar-repeating beat: kick on 1 and 3 (plus syncopation), snare on 2 and 4, 8th hats, decaying bass.

    Returns:
        np.ndarray: [T] float32 mono audio, peak about 0.7.
    """
    length = int(round(duration * sample_rate))
    out = np.zeros(length, dtype=np.float64)
    beat = 60.0 / bpm
    t = np.arange(int(0.6 * sample_rate)) / sample_rate
    kick = np.sin(2 * math.pi * (45 * t + 75 / 30 * (1 - np.exp(-30 * t)))) * np.exp(-9 * t)
    bass = np.sin(2 * math.pi * root_hz * 2 * t) * np.exp(-3 * t) * np.minimum(1, t * 200)
    snare_t = t[:int(0.2 * sample_rate)]
    snare = (0.6 * rng.standard_normal(snare_t.size) + np.sin(2 * math.pi * 190 * snare_t)) * np.exp(-22 * snare_t)
    hat_t = t[:int(0.03 * sample_rate)]
    hat = np.diff(rng.standard_normal(hat_t.size + 1)) * np.exp(-150 * hat_t)
    kick_steps = {0, 6, 8} if bpm < 120 else {0, 8, 10}
    step = beat / 4
    for index in range(int(duration / step) + 1):
        start = int(round(index * step * sample_rate))
        position = index % 16
        if position in kick_steps:
            _mix(out, start, 0.8 * kick)
            _mix(out, start, 0.35 * bass)
        if position in (4, 12):
            _mix(out, start, 0.35 * snare)
        if position % 2 == 0 or bpm < 100:
            _mix(out, start, 0.12 * hat)
    out *= 0.7 / max(1e-9, np.abs(out).max())
    return out.astype(np.float32)


def make_example_dataset(egs_dir: Path, audio_dir: Path, relative_to: tp.Optional[Path],
                         seed: int = 0) -> tp.Dict[str, Path]:
    """Write the demo clips, their sidecars and the four split manifests.

    Args:
        egs_dir (Path): Dataset folder, e.g. `egs/example`; gets `{train,valid,evaluate,generate}/data.jsonl`.
        audio_dir (Path): Where the FLAC clips and their `<stem>.json` sidecars go.
        relative_to (Path, optional): Write manifest paths relative to this folder (e.g. the repository root, for
            committed manifests); absolute paths when None.
        seed (int): Seed of the noise in snares and hats; same seed, same bytes.
    Returns:
        dict: split -> manifest path.
    """
    rng = np.random.default_rng(seed)
    entries = []
    for index, (description, genre, bpm, key, moods, instrument) in enumerate(EXAMPLE_CLIPS):
        duration = 3.0 + 0.5 * (index % 3)
        root_hz = _NOTE_HZ[key.split()[0]]
        wav = synthesize_beat(bpm, root_hz, duration, rng)
        path = Path(audio_dir) / f"beat_{index:02d}_{genre.replace(' ', '_')}.flac"
        write_audio(path, torch.from_numpy(wav)[None], SAMPLE_RATE)
        info = normalize_music_info({'description': description, 'genre': genre, 'bpm': bpm, 'key': key,
                                     'moods': moods, 'instrument': instrument, 'title': f"example beat {index}",
                                     'artist': 'audiocraft-lora example', 'keywords': [genre, instrument],
                                     'name': path.stem})
        write_sidecar(sidecar_path_for(path), info)
        entries.append(manifest_entry(path, wav.shape[-1] / SAMPLE_RATE, SAMPLE_RATE, relative_to))
    return {split: write_manifest(Path(egs_dir) / split, entries[SPLIT_SLICES[split]]) for split in SPLITS}


def _mix(out: np.ndarray, start: int, sound: np.ndarray) -> None:
    end = min(out.size, start + sound.size)
    if start < end:
        out[start:end] += sound[:end - start]
