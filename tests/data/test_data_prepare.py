"""`prepare`: folders and metadata.json in, manifests + sidecars + dset yaml out, readable by AudioCraft itself."""
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from audiocraft_lora.data import placement
from audiocraft_lora.data import prepare as prepare_module
from audiocraft_lora.data.prepare import prepare_dataset
from audiocraft_lora.errors import DataError
from data_helpers import MUSIC_INFO_KEYS, write_tone


def _lines(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _music_dataset(split_dir: Path, segment: float, num_samples: int):
    from audiocraft.data.music_dataset import MusicDataset
    return MusicDataset.from_meta(split_dir, segment_duration=segment, sample_rate=32000, channels=1,
                                  return_info=True, num_samples=num_samples, shuffle=False, pad=True,
                                  min_segment_ratio=0.5)


def _iterate(dataset, batch_size: int = 3):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collater)
    for wav, infos in loader:
        yield wav, infos


@pytest.fixture
def user_folder(tmp_path):
    """Mixed formats/rates/channels, nested and non-ASCII names, captions as .txt/.json, one clip uncaptioned."""
    root = tmp_path / 'my beats'
    captions = {}
    clip = write_tone(root / 'trap 808 ü.wav', 3.0, sample_rate=44100, channels=2)
    (root / 'trap 808 ü.txt').write_text('trap beat with 808 bass, 140 bpm\n', encoding='utf-8')
    captions[clip] = 'trap beat with 808 bass, 140 bpm'
    clip = write_tone(root / 'nested' / '曲-1.mp3', 3.0, sample_rate=44100, channels=2, frequency=330)
    (root / 'nested' / '曲-1.json').write_text(json.dumps({'caption': 'lofi 曲 with dusty drums', 'bpm': '85 bpm',
                                                          'moods': 'chill, dusty'}), encoding='utf-8')
    captions[clip] = 'lofi 曲 with dusty drums'
    clip = write_tone(root / 'nested' / 'deep' / 'c.flac', 3.0, frequency=440)
    (root / 'nested' / 'deep' / 'c.txt').write_text('house groove', encoding='utf-8')
    captions[clip] = 'house groove'
    clip = write_tone(root / 'd.ogg', 3.0, sample_rate=48000, frequency=550)
    (root / 'd.txt').write_text('drill beat', encoding='utf-8')
    captions[clip] = 'drill beat'
    clip = write_tone(root / 'e.wav', 3.0, frequency=660)
    captions[clip] = None
    return root, captions


def test_prepare_folder_is_read_by_audiocraft_music_dataset(tmp_path, user_folder):
    root, captions = user_folder
    result = prepare_dataset(root, 'beats', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                             valid_ratio=0.4, seed=0)
    splits = {split: _lines(tmp_path / 'egs' / 'beats' / split / 'data.jsonl')
              for split in ('train', 'valid', 'evaluate', 'generate')}
    train_paths = {e['path'] for e in splits['train']}
    valid_paths = {e['path'] for e in splits['valid']}
    assert len(train_paths) == 3 and len(valid_paths) == 2 and not train_paths & valid_paths
    # The mp3's own sidecar holds other values ("bpm": "85 bpm"): left untouched, the clip mirrored with ours.
    mirrored = tmp_path / 'egs' / 'beats' / 'audio' / 'nested' / '曲-1.mp3'
    captions[mirrored] = captions.pop(root / 'nested' / '曲-1.mp3')
    assert train_paths | valid_paths == {str(path) for path in captions}
    assert mirrored.is_symlink() and result.placements == {'in_place': 4, 'mirrored': 1}
    assert splits['evaluate'] == splits['valid']
    assert 1 <= len(splits['generate']) <= 4 and all(e in splits['valid'] for e in splits['generate'])
    assert all(os.path.isabs(e['path']) for e in splits['train'] + splits['valid'])
    mp3 = next(e for e in splits['train'] + splits['valid'] if e['path'].endswith('.mp3'))
    assert mp3['sample_rate'] == 44100 and mp3['duration'] == pytest.approx(3.0, abs=0.1)
    # Missing captions: counted, and the check training runs refuses the dataset (no "Next:" command).
    assert result.uncaptioned == [root / 'e.wav']
    summary = result.summary()
    assert '1 source file(s) without a caption' in summary and 'Next:' not in summary
    assert not result.ok and result.report.codes() == ['empty_description']
    # The user's sidecar is byte-for-byte theirs; ours has every MusicInfo field, values normalised.
    assert json.loads((root / 'nested' / '曲-1.json').read_text(encoding='utf-8')) == {
        'caption': 'lofi 曲 with dusty drums', 'bpm': '85 bpm', 'moods': 'chill, dusty'}
    assert any('曲-1.json' in warning and '--overwrite-sidecars' in warning for warning in result.warnings)
    sidecar = json.loads(mirrored.with_suffix('.json').read_text())
    assert set(MUSIC_INFO_KEYS) <= set(sidecar)
    assert set(MUSIC_INFO_KEYS) <= set(json.loads((root / 'd.json').read_text()))
    assert sidecar['bpm'] == 85.0 and sidecar['moods'] == ['chill', 'dusty']
    assert sidecar['description'] == 'lofi 曲 with dusty drums'
    # AudioCraft's own dataset loads it, audio has the target shape, descriptions are the captions.
    by_path = {str(path): caption for path, caption in captions.items()}
    seen = set()
    for split in ('train', 'valid'):
        dataset = _music_dataset(tmp_path / 'egs' / 'beats' / split, segment=2.0, num_samples=12)
        for wav, infos in _iterate(dataset):
            assert wav.shape[1:] == (1, 64000)
            for info in infos:
                assert info.description == by_path[info.meta.path]
                seen.add(info.meta.path)
    assert len(seen) >= 4


def test_description_option_only_fills_missing_captions(tmp_path, user_folder):
    root, captions = user_folder
    result = prepare_dataset(root, 'beats', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                             description='generic hip hop beat')
    assert result.uncaptioned == [] and result.uncaptioned_entries == 0
    assert json.loads((root / 'e.json').read_text())['description'] == 'generic hip hop beat'
    assert json.loads((root / 'd.json').read_text())['description'] == 'drill beat'


def test_dset_yaml_has_all_four_splits_in_audiocraft_format(tmp_path, user_folder):
    root, _ = user_folder
    egs = tmp_path / 'egs'
    result = prepare_dataset(root, 'beats', egs_root=egs, config_root=tmp_path / 'config')
    assert result.dset_yaml == tmp_path / 'config' / 'dset' / 'audio' / 'beats.yaml'
    text = result.dset_yaml.read_text()
    assert text.startswith('# @package __global__\n')
    from omegaconf import OmegaConf
    datasource = OmegaConf.to_container(OmegaConf.load(result.dset_yaml))['datasource']
    assert datasource == {'max_sample_rate': 48000, 'max_channels': 2,
                          **{split: str(egs / 'beats' / split) for split in ('train', 'valid', 'evaluate', 'generate')}}


def test_metadata_list_with_split_field_relative_to_metadata_file(tmp_path, monkeypatch):
    data = tmp_path / 'user_data'
    records = []
    for index in range(5):
        write_tone(data / 'clips' / f'{index:03d}.wav', 2.0, sample_rate=44100, channels=2, frequency=200 + 50 * index)
        records.append({'audio': f'clips/{index:03d}.wav', 'text': f'hip hop 808 beat number {index}',
                        'genre': 'Trap', 'bpm': 140, 'key': 'F minor', 'split': 'valid' if index == 4 else 'train'})
    (data / 'metadata.json').write_text(json.dumps(records))
    monkeypatch.chdir(tmp_path)  # relative audio paths must resolve against the metadata file, not the cwd
    result = prepare_dataset(data / 'metadata.json', 'style', egs_root=tmp_path / 'egs',
                             config_root=tmp_path / 'config')
    assert [Path(m.path).name for m in result.splits['train']] == ['000.wav', '001.wav', '002.wav', '003.wav']
    assert [Path(m.path).name for m in result.splits['valid']] == ['004.wav']
    dataset = _music_dataset(tmp_path / 'egs' / 'style' / 'train', segment=1.5, num_samples=6)
    wav, info = dataset[0]
    assert wav.shape == (1, 48000)
    assert info.description == f"hip hop 808 beat number {int(Path(info.meta.path).stem)}"
    assert info.genre == 'trap' and info.bpm == 140.0 and info.key == 'f minor'


def test_metadata_train_valid_object_and_seeded_split(tmp_path):
    data = tmp_path / 'data'
    for index in range(10):
        write_tone(data / f'c{index}.flac', 1.0, frequency=200 + 30 * index)
    layout = {'train': [{'path': f'c{i}.flac', 'description': f'beat {i}'} for i in range(8)],
              'valid': [{'path': f'c{i}.flac', 'prompt': f'beat {i}'} for i in range(8, 10)]}
    (data / 'meta.json').write_text(json.dumps(layout))
    result = prepare_dataset(data / 'meta.json', 'obj', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert sorted(Path(m.path).name for m in result.splits['valid']) == ['c8.flac', 'c9.flac']
    assert len(result.splits['train']) == 8

    flat = [{'filename': f'c{i}.flac', 'caption': f'beat {i}'} for i in range(10)]
    (data / 'flat.json').write_text(json.dumps(flat))

    def valid_names(seed):
        out = prepare_dataset(data / 'flat.json', 'flat', egs_root=tmp_path / f'egs{seed}',
                              config_root=tmp_path / 'cfg', seed=seed, valid_ratio=0.2)
        return sorted(Path(m.path).name for m in out.splits['valid'])
    first = valid_names(0)
    assert len(first) == 2 and valid_names(0) == first
    assert any(valid_names(seed) != first for seed in (1, 2, 3))


def test_fifteen_second_clips_suggest_fifteen_second_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, 'CONFIG_DIR', tmp_path / 'config')  # stands for the checkout's config/
    folder = tmp_path / 'clips'
    for index in range(4):
        write_tone(folder / f'{index}.wav', 15.0, frequency=100 + 20 * index)
        (folder / f'{index}.txt').write_text('trap hiphop beat, 808 sub bass heavy')
    result = prepare_dataset(folder, 'fifteen', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config')
    assert result.suggested_segment_duration == 15
    assert result.next_command == ('dora run solver=musicgen/lora_small dset=audio/fifteen '
                                   'dataset.segment_duration=15')
    summary = result.summary()
    assert 'median 15.0 s' in summary and '15-20 s' in summary and result.next_command in summary


def test_relative_to_writes_paths_audiocraft_resolves_from_the_launch_folder(tmp_path, monkeypatch):
    project = tmp_path / 'project'
    folder = project / 'data'
    for index in range(3):
        write_tone(folder / f'{index}.wav', 2.0)
        (folder / f'{index}.txt').write_text(f'beat {index}')
    monkeypatch.chdir(project)
    prepare_dataset('data', 'rel', egs_root='egs', config_root='config', relative_to='.')
    entries = _lines(project / 'egs' / 'rel' / 'train' / 'data.jsonl')
    assert all(e['path'].startswith('data/') for e in entries)
    assert (project / 'config' / 'dset' / 'audio' / 'rel.yaml').read_text().count('egs/rel/') == 4
    wav, info = _music_dataset(Path('egs/rel/train'), segment=1.0, num_samples=2)[0]
    assert info.description.startswith('beat ') and wav.shape == (1, 32000)


def test_segment_seconds_cuts_long_files_and_keeps_chunks_in_one_split(tmp_path):
    folder = tmp_path / 'long'
    write_tone(folder / 'long.wav', 7.0, sample_rate=44100, channels=2)
    (folder / 'long.txt').write_text('long trap jam')
    write_tone(folder / 'short.wav', 2.0)
    (folder / 'short.txt').write_text('short loop')
    write_tone(folder / 'other.wav', 2.5)
    (folder / 'other.txt').write_text('other loop')
    result = prepare_dataset(folder, 'cut', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                             segment_seconds=3.0, valid_ratio=0.3)
    metas = result.splits['train'] + result.splits['valid']
    chunks = [m for m in metas if 'long_' in Path(m.path).name]
    assert sorted(Path(m.path).name for m in chunks) == ['long_000.flac', 'long_001.flac']  # 1 s tail dropped
    assert all(m.duration == pytest.approx(3.0) and m.sample_rate == 32000 for m in chunks)
    assert all(Path(m.path).parent == tmp_path / 'egs' / 'cut' / 'audio' for m in chunks)
    split_of = {m.path: split for split in ('train', 'valid') for m in result.splits[split]}
    assert len({split_of[m.path] for m in chunks}) == 1
    import soundfile
    info = soundfile.info(chunks[0].path)
    assert (info.samplerate, info.channels) == (32000, 1)
    assert json.loads(Path(chunks[0].path).with_suffix('.json').read_text())['description'] == 'long trap jam'
    assert any(m.path == str(folder / 'short.wav') for m in metas)  # short files stay in place
    assert result.placements == {'cut': 2, 'in_place': 2}


def test_sidecar_dir_mirrors_clips_and_leaves_the_source_untouched(tmp_path):
    folder = tmp_path / 'readonly_src'
    for index in range(3):
        write_tone(folder / f'{index}.mp3', 1.5, sample_rate=44100)
        (folder / f'{index}.txt').write_text(f'mirrored beat {index}')
    before = sorted(p.name for p in folder.iterdir())
    mirror = tmp_path / 'mirror'
    result = prepare_dataset(folder, 'mir', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                             sidecar_dir=mirror)
    assert sorted(p.name for p in folder.iterdir()) == before
    for meta in result.splits['train'] + result.splits['valid']:
        link = Path(meta.path)
        assert link.parent == mirror and link.is_symlink() and link.resolve().parent == folder.resolve()
        assert link.with_suffix('.json').is_file()
    wav, info = _music_dataset(tmp_path / 'egs' / 'mir' / 'train', segment=1.0, num_samples=2)[0]
    assert info.description == f"mirrored beat {Path(info.meta.path).stem}"


def test_unwritable_source_folder_falls_back_to_a_mirror(tmp_path, monkeypatch):
    """Root can write anywhere, so an unwritable folder is simulated by making in-place sidecar writes fail."""
    folder = tmp_path / 'src'
    for index in range(2):
        write_tone(folder / f'{index}.wav', 1.0)
        (folder / f'{index}.txt').write_text(f'beat {index}')
    real_write = placement.write_sidecar

    def refuse_in_source(path, info):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real_write(path, info)
    monkeypatch.setattr(placement, 'write_sidecar', refuse_in_source)
    result = prepare_dataset(folder, 'ro', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config')
    assert result.placements == {'mirrored': 2}
    assert any('not writable' in warning for warning in result.warnings)
    assert not list(folder.glob('*.json'))
    for meta in result.splits['train'] + result.splits['valid']:
        assert Path(meta.path).parent == tmp_path / 'egs' / 'ro' / 'audio'
        assert json.loads(Path(meta.path).with_suffix('.json').read_text())['description'].startswith('beat ')


def test_files_sharing_a_stem_get_distinct_sidecars(tmp_path):
    folder = tmp_path / 'stems'
    write_tone(folder / 'a.wav', 1.0)
    write_tone(folder / 'a.mp3', 1.0, sample_rate=44100)
    (folder / 'a.txt').write_text('shared caption')
    write_tone(folder / 'b.wav', 1.0)
    (folder / 'b.txt').write_text('b caption')
    result = prepare_dataset(folder, 'stems', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config')
    metas = result.splits['train'] + result.splits['valid']
    sidecars = [Path(m.path).with_suffix('.json') for m in metas]
    assert len(set(sidecars)) == 3 and all(path.is_file() for path in sidecars)


def test_unusable_inputs_are_all_named_or_skipped(tmp_path):
    folder = tmp_path / 'mixed'
    for index in range(3):
        write_tone(folder / f'good{index}.wav', 1.0)
    (folder / 'broken.mp3').write_bytes(os.urandom(3000))
    (folder / 'empty.wav').write_bytes(b'')
    with pytest.raises(DataError) as caught:
        prepare_dataset(folder, 'bad', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config')
    message = str(caught.value)
    assert '2 problem(s) with the inputs' in message and 'broken.mp3' in message and 'empty.wav' in message
    assert '--skip-bad' in message
    assert not (tmp_path / 'egs' / 'bad').exists()
    result = prepare_dataset(folder, 'bad', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                             skip_bad=True)
    assert len(result.splits['train'] + result.splits['valid']) == 3
    assert sum('skipped' in warning for warning in result.warnings) == 2


@pytest.mark.parametrize('content, expected', [
    ('{"train": [', 'is not valid JSON'),
    (json.dumps([{'description': 'no path here'}]), 'no audio path'),
    (json.dumps([{'path': 'nowhere.wav', 'description': 'x'}]), 'nowhere.wav is missing'),
    (json.dumps({'clips': []}), "unexpected keys ['clips']"),
    (json.dumps([{'path': 'a.wav', 'split': 'holdout', 'description': 'x'}]), "unknown split 'holdout'"),
])
def test_bad_metadata_names_the_file_and_record(tmp_path, content, expected):
    write_tone(tmp_path / 'a.wav', 1.0)
    (tmp_path / 'metadata.json').write_text(content)
    with pytest.raises(DataError) as caught:
        prepare_dataset(tmp_path / 'metadata.json', 'm', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert expected in str(caught.value) and 'metadata.json' in str(caught.value)


def test_generate_split_prefers_distinct_captions():
    """AudioCraft names a generated sample after its conditioning: two of one caption would share a file."""
    from types import SimpleNamespace
    from audiocraft_lora.data.prepare import _generate_subset
    captions = ['trap beat', 'trap beat', 'lofi', 'trap beat', 'drill']
    placed = [(SimpleNamespace(audio_path=f'/a/{i}.wav', info={'description': c}), None)
              for i, c in enumerate(captions)]
    valid = [f'meta{i}' for i in range(len(captions))]
    assert _generate_subset(placed, valid, 3) == ['meta0', 'meta2', 'meta4']
    assert _generate_subset(placed, valid, 5) == ['meta0', 'meta2', 'meta4', 'meta1', 'meta3']  # (then the rest)
