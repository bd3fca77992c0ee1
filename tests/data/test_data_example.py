"""The bundled demo dataset: deterministic, tiny, four clean splits readable by AudioCraft's MusicDataset."""
import hashlib
import json
from pathlib import Path

from audiocraft_lora.data.example import make_example_dataset
from audiocraft_lora.data.validate import validate_datasource


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob('*')):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_example_dataset_is_small_deterministic_and_clean(tmp_path, monkeypatch):
    first, second = tmp_path / 'a', tmp_path / 'b'
    for root in (first, second):
        make_example_dataset(root / 'egs' / 'example', root / 'egs' / 'example' / 'audio', relative_to=root)
    assert _digest(first) == _digest(second)
    audio = first / 'egs' / 'example' / 'audio'
    assert len(list(audio.glob('*.flac'))) == 12
    assert sum(path.stat().st_size for path in first.rglob('*') if path.is_file()) < 1.5e6

    counts = {split: len((first / 'egs' / 'example' / split / 'data.jsonl').read_text().splitlines())
              for split in ('train', 'valid', 'evaluate', 'generate')}
    assert counts == {'train': 8, 'valid': 2, 'evaluate': 2, 'generate': 2}
    line = json.loads((first / 'egs' / 'example' / 'train' / 'data.jsonl').read_text().splitlines()[0])
    assert line['path'] == 'egs/example/audio/beat_00_trap.flac' and line['sample_rate'] == 32000

    monkeypatch.chdir(first)  # relative manifest paths resolve against the launch folder, as under dora
    datasource = {split: f'egs/example/{split}' for split in counts}
    report = validate_datasource(datasource, segment_duration=3.0)
    assert report.errors == [] and report.warnings == [], report.summary_table()

    from audiocraft.data.music_dataset import MusicDataset
    dataset = MusicDataset.from_meta('egs/example/train', segment_duration=3.0, sample_rate=32000, channels=1,
                                     return_info=True, num_samples=4, shuffle=False, pad=True)
    wav, info = dataset[0]
    assert wav.shape == (1, 96000) and float(wav.abs().max()) > 0.3
    assert 'bpm' in info.description and info.bpm is not None and info.genre is not None
