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
    # dora reads dset yamls from the checkout only: another --config-root is passed as the split folders.
    assert ('Next: dora run solver=musicgen/lora_small datasource.train=' + str(egs / 'cli' / 'train')) in out
    assert 'dset=audio/cli dataset' not in out and 'dataset.segment_duration=2' in out
    assert f'audiocraft-lora validate dset=audio/cli --config-root {config} --segment-duration 2' in out
    assert 'add base_model=' in out
    assert len((egs / 'cli' / 'generate' / 'data.jsonl').read_text().splitlines()) == 1

    code = main(['validate', 'dset=audio/cli', '--config-root', str(config), '--segment-duration', '2'])
    out = capsys.readouterr().out
    assert code == 0 and 'Errors: none' in out and 'OK: no errors' in out


def test_prepare_into_the_checkout_config_names_the_dset_and_the_base(tmp_path, capsys, monkeypatch):
    from audiocraft_lora.data import prepare as prepare_module
    monkeypatch.setattr(prepare_module, 'CONFIG_DIR', tmp_path / 'config')  # stands for the checkout's config/
    source = _folder(tmp_path / 'clips')
    base = tmp_path / 'local' / 'musicgen-small'
    base.mkdir(parents=True)
    code = main(['prepare', str(source), '--name', 'mine', '--egs-root', str(tmp_path / 'egs'),
                 '--config-root', str(tmp_path / 'config'), '--base-model', str(base)])
    out = capsys.readouterr().out
    assert code == 0
    assert (f'Next: dora run solver=musicgen/lora_small dset=audio/mine dataset.segment_duration=2 '
            f'base_model={base}') in out
    assert 'validate dset=audio/mine --segment-duration 2' in out and 'add base_model=' not in out


def test_prepare_refuses_data_validate_would_refuse(tmp_path, capsys):
    """Exit 2 and no "Next:" line when the written dataset fails the checks training runs."""
    source = _folder(tmp_path / 'clips')
    write_tone(source / 'uncaptioned.wav', 2.0)
    code = main(['prepare', str(source), '--name', 'nocap', '--egs-root', str(tmp_path / 'egs'),
                 '--config-root', str(tmp_path / 'config')])
    captured = capsys.readouterr()
    assert code == 2
    assert 'Next:' not in captured.out and 'NOT READY' in captured.out and 'uncaptioned.json' in captured.out
    assert 'empty_description x1' in captured.err and 'prepare` again' in captured.err


def test_validate_defaults_to_the_recipe_segment_and_says_so(tmp_path, capsys):
    clip = write_tone(tmp_path / 'clip.wav', 15.0)
    write_sidecar(clip)
    manifest = write_manifest(tmp_path / 'train' / 'data.jsonl', [entry(clip, 15.0)])
    assert main(['validate', '--manifest', str(manifest)]) == 0
    out = capsys.readouterr().out
    assert 'segment_duration=15 s (dataset.segment_duration of solver=musicgen/lora_small' in out
    assert 'short_clip' not in out and 'padded' not in out  # 15 s clips on the recipe's 15 s segments
    assert main(['validate', '--manifest', str(manifest), '--recipe', 'solver=musicgen/lora_debug']) == 0
    assert 'segment_duration=4 s' in capsys.readouterr().out
    assert main(['validate', '--manifest', str(manifest), '--segment-duration', '30']) == 0
    out = capsys.readouterr().out
    assert 'from --segment-duration' in out and 'padded with 15.0 s' in out
    assert main(['validate', '--manifest', str(manifest), '--recipe', 'nope']) == 2
    assert 'lora_small' in capsys.readouterr().err


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
        write_tone(data / f'{index}.wav', 1.5, frequency=200 + 50 * index)
        records.append({'file': f'{index}.wav', 'description': f'beat {index}', 'split': 'valid' if index else 'train'})
    (data / 'metadata.json').write_text(json.dumps(records))
    code = main(['prepare', str(data / 'metadata.json'), '--name', 'meta', '--egs-root', str(tmp_path / 'egs'),
                 '--config-root', str(tmp_path / 'config'), '--relative-to', str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / 'egs' / 'meta' / 'valid' / 'data.jsonl').read_text().splitlines()]
    assert [line['path'] for line in lines] == ['data/1.wav', 'data/2.wav', 'data/3.wav']
