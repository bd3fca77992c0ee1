"""`audiocraft-lora prepare` / `validate` through the real console entry point: 0 on good data, 2 + message on bad."""
import json
import os
from pathlib import Path

from audiocraft_lora.cli import main
from data_helpers import entry, write_manifest, write_sidecar, write_tone


def _folder(root: Path, count: int = 3) -> Path:
    for index in range(count):
        write_tone(root / f'clip{index}.wav', 2.0, frequency=200 + 60 * index)
        (root / f'clip{index}.txt').write_text(f'trap beat number {index}')
    return root


def test_prepare_then_validate_succeed(tmp_path, capsys):
    source = _folder(tmp_path / 'clips')
    egs, config = tmp_path / 'egs', tmp_path / 'config'
    code = main(['prepare', str(source), '--name', 'cli', '--egs-root', str(egs), '--config-root', str(config),
                 '--valid-ratio', '0.34', '--num-generate', '1'])
    out = capsys.readouterr().out
    assert code == 0
    assert 'train         2 clips' in out and 'valid         1 clips' in out
    assert 'Next: dora run solver=musicgen/lora_small dset=audio/cli dataset.segment_duration=2' in out
    assert len((egs / 'cli' / 'generate' / 'data.jsonl').read_text().splitlines()) == 1

    code = main(['validate', 'dset=audio/cli', '--config-root', str(config), '--segment-duration', '2'])
    out = capsys.readouterr().out
    assert code == 0 and 'Errors: none' in out and 'OK: no errors' in out


def test_prepare_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    source = _folder(tmp_path / 'clips')
    (source / 'corrupt.mp3').write_bytes(os.urandom(2000))
    code = main(['prepare', str(source), '--name', 'bad', '--egs-root', str(tmp_path / 'egs'),
                 '--config-root', str(tmp_path / 'config')])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith('audiocraft-lora prepare: error:') and 'corrupt.mp3' in err and 'Traceback' not in err


def test_validate_bad_data_exits_2_listing_each_file(tmp_path, capsys):
    good = write_tone(tmp_path / 'good.wav', 2.0)
    write_sidecar(good)
    uncaptioned = write_tone(tmp_path / 'uncaptioned.wav', 2.0)
    manifest = write_manifest(tmp_path / 'train' / 'data.jsonl', [
        entry(good, 2.0), entry(uncaptioned, 2.0), entry(tmp_path / 'gone.wav', 2.0), '{broken'])
    code = main(['validate', '--manifest', str(manifest), '--segment-duration', '2'])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith('audiocraft-lora validate: error: 3 data error(s)')
    for text in ('uncaptioned.json', 'missing_sidecar', 'gone.wav', 'missing_file', 'line 4', 'bad_manifest_line'):
        assert text in captured.err, text
    assert 'good.wav' not in captured.err
    assert 'Traceback' not in captured.err and 'Errors (3)' in captured.out


def test_validate_missing_dset_and_no_target_exit_2(tmp_path, capsys):
    assert main(['validate', 'dset=audio/nope', '--config-root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'nope.yaml does not exist' in err and 'audiocraft-lora prepare' in err
    assert main(['validate']) == 2
    assert 'nothing to check' in capsys.readouterr().err


def test_prepare_metadata_json_via_cli(tmp_path, capsys):
    data = tmp_path / 'data'
    records = []
    for index in range(4):
        write_tone(data / f'{index}.wav', 1.5)
        records.append({'file': f'{index}.wav', 'description': f'beat {index}', 'split': 'valid' if index else 'train'})
    (data / 'metadata.json').write_text(json.dumps(records))
    code = main(['prepare', str(data / 'metadata.json'), '--name', 'meta', '--egs-root', str(tmp_path / 'egs'),
                 '--config-root', str(tmp_path / 'config'), '--relative-to', str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / 'egs' / 'meta' / 'valid' / 'data.jsonl').read_text().splitlines()]
    assert [line['path'] for line in lines] == ['data/1.wav', 'data/2.wav', 'data/3.wav']
