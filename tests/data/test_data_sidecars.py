"""`prepare` never silently changes a sidecar json the user (or another dataset) wrote next to the audio."""
import json
from pathlib import Path

import pytest

from audiocraft_lora.data.prepare import prepare_dataset
from audiocraft_lora.errors import DataError
from data_helpers import write_tone


def _captioned_folder(folder: Path, count: int = 3) -> Path:
    for index in range(count):
        write_tone(folder / f'clip_{index}.wav', 1.5, frequency=200 + 60 * index)
        (folder / f'clip_{index}.txt').write_text(f'trap beat number {index}')
    return folder


def _metadata(path: Path, folder: Path, count: int = 3, **record) -> Path:
    path.write_text(json.dumps([{'path': str(folder / f'clip_{index}.wav'), **record} for index in range(count)]))
    return path


def test_second_dataset_on_the_same_audio_keeps_the_first_ones_captions(tmp_path):
    folder = _captioned_folder(tmp_path / 'good')
    first = prepare_dataset(folder, 'good', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert first.ok and first.placements == {'in_place': 3}
    before = {path.name: path.read_bytes() for path in folder.glob('*.json')}
    meta = _metadata(tmp_path / 'meta.json', folder, description='another caption')
    second = prepare_dataset(meta, 'other', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert {path.name: path.read_bytes() for path in folder.glob('*.json')} == before
    assert second.placements == {'mirrored': 3} and second.ok
    warning = next(w for w in second.warnings if '--overwrite-sidecars' in w)
    assert "clip_0.json: writing it would change description 'trap beat number 0' -> 'another caption'" in warning
    for meta_entry in second.splits['train'] + second.splits['valid']:
        assert json.loads(Path(meta_entry.path).with_suffix('.json').read_text())['description'] == 'another caption'
    # The first dataset still trains on its own captions.
    again = prepare_dataset(folder, 'good', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert again.placements == {'in_place': 3}


def test_overwrite_sidecars_replaces_them_after_a_backup(tmp_path):
    folder = _captioned_folder(tmp_path / 'good')
    prepare_dataset(folder, 'good', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    original = (folder / 'clip_0.json').read_bytes()
    meta = _metadata(tmp_path / 'meta.json', folder, description='another caption')
    result = prepare_dataset(meta, 'other', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg',
                             overwrite_sidecars=True)
    assert result.placements == {'in_place': 3}
    assert json.loads((folder / 'clip_0.json').read_text())['description'] == 'another caption'
    assert (folder / 'clip_0.json.bak').read_bytes() == original
    assert any('clip_0.json.bak' in warning for warning in result.warnings)


def test_unreadable_user_sidecar_is_never_replaced_without_a_backup(tmp_path):
    folder = _captioned_folder(tmp_path / 'src')
    broken = b'{"description": "my own caption",'
    (folder / 'clip_0.json').write_bytes(broken)
    result = prepare_dataset(folder, 'src', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert (folder / 'clip_0.json').read_bytes() == broken
    assert any("clip_0.json: it can't be read as JSON" in warning for warning in result.warnings)
    assert result.placements == {'in_place': 2, 'mirrored': 1}
    prepare_dataset(folder, 'src', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg', overwrite_sidecars=True)
    assert (folder / 'clip_0.json.bak').read_bytes() == broken
    assert json.loads((folder / 'clip_0.json').read_text())['description'] == 'trap beat number 0'  # from the .txt


def test_metadata_keys_of_other_tools_and_repeated_errors(tmp_path):
    folder = _captioned_folder(tmp_path / 'clips', count=4)
    records = [{'audio_filepath': str(folder / 'clip_0.wav'), 'caption': 'a'},
               {'file_name': str(folder / 'clip_1.wav'), 'caption': 'b'}]
    (tmp_path / 'ok.json').write_text(json.dumps(records))
    result = prepare_dataset(tmp_path / 'ok.json', 'hf', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg',
                             overwrite_sidecars=True)
    assert len(result.splits['train'] + result.splits['valid']) == 2
    (tmp_path / 'unknown.json').write_text(json.dumps([{'wav': f'clip_{i}.wav', 'caption': 'x'} for i in range(4)]))
    with pytest.raises(DataError) as caught:
        prepare_dataset(tmp_path / 'unknown.json', 'u', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    message = str(caught.value)
    assert message.count('no audio path') == 1 and '4 records (record 0, record 1, record 2, record 3)' in message
    assert "keys are caption, wav" in message and 'audio_filepath' in message and 'file_name' in message


@pytest.mark.parametrize('value, expected', [(5, '"description" is a JSON int (5), not text'),
                                             ('', '"description" is empty')])
def test_caption_that_is_no_text_is_refused_by_prepare(tmp_path, value, expected):
    folder = _captioned_folder(tmp_path / 'clips')
    meta = _metadata(tmp_path / 'meta.json', folder, description=value)
    with pytest.raises(DataError) as caught:
        prepare_dataset(meta, 'num', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert expected in str(caught.value) and '3 records' in str(caught.value)
    assert not (tmp_path / 'egs' / 'num').exists()


def test_null_or_missing_fields_are_filled_in_and_an_identical_sidecar_is_not_rewritten(tmp_path):
    """Filling what the user left empty is not a conflict (the clip stays in place); a sidecar that already says
    everything is left untouched, byte for byte and time for time."""
    import os
    from audiocraft_lora.data.sidecars import sidecar_conflict
    folder = _captioned_folder(tmp_path / 'beats', count=3)
    info = {'description': 'trap beat number 0', 'genre': 'trap'}
    sidecar = folder / 'clip_0.json'
    for existing in ({'description': 'trap beat number 0', 'genre': None}, {'description': 'trap beat number 0'}):
        sidecar.write_text(json.dumps(existing))
        assert sidecar_conflict(sidecar, info) is None, existing
    sidecar.write_text(json.dumps({'description': 'trap beat number 0', 'genre': 'lofi'}))
    assert "genre 'lofi' -> 'trap'" in sidecar_conflict(sidecar, info)
    sidecar.unlink()
    first = prepare_dataset(folder, 'beats', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert first.placements == {'in_place': 3}
    stamps = {path.name: os.stat(path).st_mtime_ns for path in folder.glob('*.json')}
    os.utime(sidecar, ns=(1, 1))  # (an old time: a rewrite would change it)
    again = prepare_dataset(folder, 'beats', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert again.placements == {'in_place': 3} and os.stat(sidecar).st_mtime_ns == 1
    assert len(stamps) == 3
