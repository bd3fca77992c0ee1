"""Silence inside the audio files (the first users' clips were padded to 30 s on disk): an error before training,
with `prepare --trim-silence` as the fix and `"allow_silence": true` / `--keep-silence` as the explicit opt-out."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiocraft_lora.cli import main
from audiocraft_lora.data.prepare import prepare_dataset
from audiocraft_lora.data.validate import validate_datasource
from data_helpers import entry, write_manifest, write_sidecar, write_tone

SR = 32000


def _padded(path: Path, sound: float, lead: float = 0.0, trail: float = 0.0, frequency: float = 220.0) -> Path:
    """A tone of `sound` seconds with digital silence before and after it, written as one file."""
    t = np.arange(int(sound * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * frequency * t)
    samples = np.concatenate([np.zeros(int(lead * SR)), tone, np.zeros(int(trail * SR))])
    return write_tone(path, samples=samples[:, None])


def _check(tmp_path: Path, audio: Path, **kwargs):
    manifest = write_manifest(tmp_path / 'train' / 'data.jsonl', [entry(audio, soundfile.info(str(audio)).duration)])
    return validate_datasource({'train': str(manifest)}, segment_duration=15.0, workers=1, **kwargs)


def test_clip_padded_to_30_s_on_disk_is_an_error_naming_the_seconds_and_the_fix(tmp_path):
    audio = _padded(tmp_path / 'padded.wav', sound=15.0, trail=15.0)
    write_sidecar(audio)
    report = _check(tmp_path, audio)
    assert report.codes() == ['edge_silence']
    message = report.errors[0].message
    assert '15.0 s of trailing silence' in message and '--trim-silence' in message and 'allow_silence' in message
    assert report.errors[0].path == str(audio)


@pytest.mark.parametrize('lead, trail, code', [(0.0, 4.0, 'edge_silence'), (4.0, 0.0, 'edge_silence')])
def test_long_leading_or_trailing_silence_is_an_error(tmp_path, lead, trail, code):
    audio = _padded(tmp_path / 'edge.wav', sound=12.0, lead=lead, trail=trail)
    write_sidecar(audio)
    report = _check(tmp_path, audio)
    assert report.codes() == [code]
    assert f"{max(lead, trail):.1f} s of {'leading' if lead else 'trailing'} silence" in report.errors[0].message


def test_mild_silence_stays_a_warning_and_allow_silence_downgrades_errors(tmp_path):
    mild = _padded(tmp_path / 'mild.wav', sound=14.0, trail=1.2)  # a natural 1.2 s tail: warn, don't block
    write_sidecar(mild)
    report = _check(tmp_path, mild)
    assert report.ok and report.codes('warnings') == ['edge_silence']
    padded = _padded(tmp_path / 'intended.wav', sound=10.0, trail=10.0)
    write_sidecar(padded, allow_silence=True)
    report = _check(tmp_path, padded)
    assert report.ok and 'Accepted' in report.warnings[0].message
    write_sidecar(padded)  # the same clip without the key: refused again, unless the whole check allows silence
    assert not _check(tmp_path, padded).ok
    assert _check(tmp_path, padded, allow_silence=True).ok


def test_prepare_reports_padded_clips_and_trim_silence_fixes_them_without_touching_originals(tmp_path, capsys):
    folder = tmp_path / 'user'
    for index in range(4):
        _padded(folder / f'clip{index}.wav', sound=5.0, lead=0.5 * index, trail=5.0, frequency=200 + 40 * index)
        (folder / f'clip{index}.txt').write_text(f'trap beat {index}')
    _padded(folder / 'hiss.wav', sound=0.3, trail=6.0)  # silence throughout once trimmed: left out
    (folder / 'hiss.txt').write_text('nearly nothing')
    before = {path.name: path.read_bytes() for path in folder.glob('*.wav')}
    args = ['prepare', str(folder), '--name', 'pad', '--egs-root', str(tmp_path / 'egs'), '--config-root',
            str(tmp_path / 'cfg')]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert 'Next:' not in captured.out and 'trailing silence' in captured.out and '--trim-silence' in captured.out

    assert main(args + ['--trim-silence']) == 0
    out = capsys.readouterr().out
    assert 'Next:' in out and 'left out 1 clip(s)' in out and 'hiss.wav' in out
    assert {path.name: path.read_bytes() for path in folder.glob('*.wav')} == before
    metas = [json.loads(line) for split in ('train', 'valid')
             for line in (tmp_path / 'egs' / 'pad' / split / 'data.jsonl').read_text().splitlines()]
    assert len(metas) == 4
    for meta in metas:
        assert Path(meta['path']).parent == tmp_path / 'egs' / 'pad' / 'audio'
        assert 5.0 <= meta['duration'] <= 5.3  # 5 s of sound, at most 0.1 s of silence kept at each edge
        assert json.loads(Path(meta['path']).with_suffix('.json').read_text())['description'].startswith('trap')
    report = validate_datasource({'train': str(tmp_path / 'egs' / 'pad' / 'train')}, segment_duration=5.0)
    assert report.ok and 'edge_silence' not in report.codes('warnings')


def test_keep_silence_marks_the_sidecars_and_training_checks_accept_them(tmp_path):
    folder = tmp_path / 'ambient'
    for index in range(3):
        _padded(folder / f'a{index}.wav', sound=4.0, trail=4.0, frequency=300 + 50 * index)
        (folder / f'a{index}.txt').write_text('sparse ambient drone')
    result = prepare_dataset(folder, 'amb', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg',
                             keep_silence=True)
    assert result.ok and 'Next:' in result.summary()
    assert 'edge_silence' in result.report.codes('warnings') and not result.report.errors
    # the choice is this dataset's: its own (mirrored) sidecars say so, the user's folder gets none of it
    assert not any(folder.glob('*.json'))
    assert all(json.loads(path.read_text())['allow_silence'] is True
               for path in (tmp_path / 'egs' / 'amb' / 'audio').rglob('*.json'))
    refused = prepare_dataset(folder, 'amb2', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg2')
    assert not refused.ok and 'edge_silence' in refused.report.codes('errors')  # (a later plain prepare: refused)
    for index in range(3):  # the user's own explicit allow_silence next to the audio is theirs to set
        (folder / f'a{index}.json').write_text(json.dumps({'description': 'sparse ambient drone',
                                                            'allow_silence': True}))
    assert prepare_dataset(folder, 'amb3', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg3').ok


@pytest.mark.parametrize('option', ['keep_silence', 'trim_silence'])
def test_an_audio_folder_that_is_the_source_never_replaces_the_users_audio(tmp_path, option):
    """--audio-dir pointing at the clips themselves: mirrors (--keep-silence) and copies (--trim-silence, written as
    .flac) would land on the user's own files. Refused, every file as it was."""
    from audiocraft_lora.errors import DataError
    beats = tmp_path / 'beats'
    for index in range(3):
        _padded(beats / f'c{index}.wav', sound=3.0, trail=3.0, frequency=200 + 60 * index)
        soundfile.write(beats / f'd{index}.flac', np.zeros(32000 * 2), 32000)  # (a .flac the copies would hit)
        _padded(beats / f'd{index}.wav', sound=3.0, trail=3.0, frequency=500 + 60 * index)
        for stem in (f'c{index}', f'd{index}'):
            (beats / f'{stem}.txt').write_text('trap beat')
    before = {path.name: path.read_bytes() for path in beats.iterdir()}
    with pytest.raises(DataError, match=r'would replace your audio file .*--audio-dir'):
        prepare_dataset(beats, 'self', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg', audio_dir=beats,
                        **{option: True})
    assert all(not path.is_symlink() for path in beats.iterdir())
    assert {name: data for name, data in before.items()} == {
        path.name: path.read_bytes() for path in beats.iterdir() if path.name in before}


@pytest.mark.parametrize('how', ['sidecar_dir', 'convert', 'metadata'])
def test_the_users_own_allow_silence_travels_with_the_clip(tmp_path, how):
    """"allow_silence": true written by the user (in their sidecar, or in a metadata.json record) is kept wherever
    prepare places the clip (mirrored, converted), so the check accepts the clips it marks."""
    folder = tmp_path / 'ambient'
    records = []
    for index in range(4):
        _padded(folder / f'a{index}.wav', sound=3.0, trail=6.0, frequency=300 + 50 * index)
        fields = {'description': 'sparse ambient drone', 'allow_silence': True}
        if how == 'metadata':
            records.append({'path': f'a{index}.wav', **fields})
        else:
            (folder / f'a{index}.json').write_text(json.dumps(fields))
    source = folder
    if how == 'metadata':
        source = folder / 'metadata.json'
        source.write_text(json.dumps(records))
    options = {'sidecar_dir': {'sidecar_dir': tmp_path / 'side'}, 'convert': {'convert': True, 'sample_rate': 16000},
               'metadata': {}}[how]
    result = prepare_dataset(source, 'amb', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg', **options)
    assert result.ok and not result.report.errors, result.report.codes('errors')
    assert 'mostly_silent' in result.report.codes('warnings')  # (accepted, still said)


def test_the_silence_rules_at_their_edges():
    """A song's 2.5 s fade-out on a 30 s clip (< 10% of it) warns, it doesn't stop training; a clip whose silence is
    inside it (trimming the edges can't help) is left out by --trim-silence, and says why."""
    import torch
    from audiocraft_lora.data.silence import plan_trim, silence_problems, silence_profile
    rate = 32000

    def clip(*parts):  # (seconds, sounding)
        on = torch.cat([torch.full((int(round(s * rate)),), float(sound)) for s, sound in parts])
        t = torch.arange(on.shape[0]) / rate
        return (0.3 * torch.sin(2 * torch.pi * 220 * t) * on)[None]

    song = silence_profile(clip((30.0, True), (2.5, False)), rate)
    assert [(severity, code) for severity, code, _ in silence_problems(song, False)] == [('warning', 'edge_silence')]
    padded = silence_profile(clip((10.0, True), (2.5, False)), rate)  # (the same 2.5 s, a fifth of the clip)
    assert ('error', 'edge_silence') in [(severity, code) for severity, code, _ in silence_problems(padded, False)]
    gaps = silence_profile(clip((0.6, True), (5.0, False), (0.6, True)), rate)
    plan = plan_trim(gaps)
    assert plan is not None and plan.dropped and 'silence even once trimmed' in plan.dropped


def test_validate_allow_silence_checks_as_a_run_with_allow_silence_does(tmp_path, capsys):
    folder = tmp_path / 'padded'
    for index in range(4):
        _padded(folder / f'p{index}.wav', sound=3.0, trail=3.0, frequency=200 + 70 * index)
        (folder / f'p{index}.txt').write_text('trap beat')
    result = prepare_dataset(folder, 'pad', egs_root=tmp_path / 'egs', config_root=tmp_path / 'cfg')
    assert not result.ok
    argv = ['validate', '--manifest', str(result.manifests['train']), '--segment-duration', '3']
    assert main(argv) == 2 and 'edge_silence' in capsys.readouterr().out
    assert main(argv + ['--allow-silence']) == 0 and 'OK: no errors' in capsys.readouterr().out
