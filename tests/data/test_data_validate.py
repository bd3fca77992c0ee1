"""`validate`: every broken input gets its own code and a message naming the file; a clean dataset passes."""
import json
import multiprocessing
import os
from pathlib import Path
import shutil
import tempfile

import numpy as np
import pytest

from audiocraft_lora.data.validate import validate_datasource, validate_manifest
from audiocraft_lora.errors import DataError
from data_helpers import entry, write_manifest, write_sidecar, write_tone


def _build(case: str, root: Path, good_clip):
    """Create one broken input; returns (datasource, expected code, 'errors'|'warnings', text naming the file)."""
    train = root / 'train' / 'data.jsonl'
    valid = root / 'valid' / 'data.jsonl'
    _, ok_entry = good_clip(root, 'ok.wav')
    _, ok_valid = good_clip(root, 'ok_valid.wav', frequency=330)
    write_manifest(valid, [ok_valid])
    source = {'train': str(train.parent), 'valid': str(valid.parent)}
    target = root / f'{case}.wav'
    if case == 'truncated_wav':
        write_tone(target, 2.0)
        write_sidecar(target)
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 3])
        lines, code, severity = [entry(target, 2.0)], 'truncated_audio', 'errors'
    elif case == 'random_bytes_mp3':
        target = root / 'noise.mp3'
        target.write_bytes(np.random.default_rng(0).bytes(4000))
        write_sidecar(target)
        lines, code, severity = [entry(target, 3.0)], 'corrupt_audio', 'errors'
    elif case == 'zero_length':
        target.write_bytes(b'')
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0)], 'zero_length', 'errors'
    elif case == 'nan_float_wav':
        samples = np.full((32000, 1), 0.1, dtype=np.float32)
        samples[1000:1010] = np.nan
        write_tone(target, samples=samples, subtype='FLOAT')
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0)], 'non_finite', 'errors'
    elif case == 'all_zero':
        write_tone(target, samples=np.zeros((32000, 1)))
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0)], 'silent', 'errors'
    elif case == 'missing_file':
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0)], 'missing_file', 'errors'
    elif case == 'bad_json_line':
        target = train
        lines, code, severity = ['{"path": "x.wav", "duration": 1.0,'], 'bad_manifest_line', 'errors'
    elif case == 'missing_fields_line':
        target = train
        lines, code, severity = [json.dumps({'path': str(root / 'ok.wav')})], 'bad_manifest_line', 'errors'
    elif case == 'missing_sidecar':
        write_tone(target, 1.0)
        lines, code, severity = [entry(target, 1.0)], 'missing_sidecar', 'errors'
    elif case == 'invalid_sidecar':
        write_tone(target, 1.0)
        target.with_suffix('.json').write_text('{"description": "oops",')
        lines, code, severity = [entry(target, 1.0)], 'invalid_sidecar', 'errors'
    elif case == 'sidecar_missing_fields':
        write_tone(target, 1.0)
        target.with_suffix('.json').write_text(json.dumps({'description': 'only a description'}))
        lines, code, severity = [entry(target, 1.0)], 'sidecar_missing_fields', 'errors'
    elif case == 'empty_description':
        write_tone(target, 1.0)
        write_sidecar(target, description='   ')
        lines, code, severity = [entry(target, 1.0)], 'empty_description', 'errors'
    elif case == '8khz':
        write_tone(target, 1.0, sample_rate=8000)
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0, 8000)], 'sample_rate_mismatch', 'warnings'
    elif case == '6_channels':
        write_tone(target, 1.0, channels=6)
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0)], 'channel_mismatch', 'warnings'
    elif case == '10_hour_claim':
        write_tone(target, 1.0)
        write_sidecar(target)
        lines, code, severity = [entry(target, 36000.0)], 'absurd_duration', 'errors'
    elif case == 'duration_mismatch':
        write_tone(target, 1.0)
        write_sidecar(target)
        lines, code, severity = [entry(target, 2.5)], 'duration_mismatch', 'errors'
    elif case == 'directory':
        target = root / 'folder.wav'
        target.mkdir()
        lines, code, severity = [entry(target, 1.0)], 'is_directory', 'errors'
    elif case == 'duplicate_across_splits':
        target = root / 'ok_valid.wav'
        lines, code, severity = [ok_valid], 'duplicate_across_splits', 'errors'
    elif case == 'duplicate_content':
        target = root / 'copy_of_valid.wav'
        shutil.copy(root / 'ok_valid.wav', target)
        write_sidecar(target)
        lines, code, severity = [entry(target, 2.0)], 'duplicate_across_splits', 'errors'
    elif case == 'clipping':
        write_tone(target, 1.0, amplitude=1.5)
        write_sidecar(target)
        lines, code, severity = [entry(target, 1.0)], 'clipping', 'warnings'
    elif case == 'missing_manifest':
        source['train'] = str(root / 'nowhere')
        return source, 'missing_manifest', 'errors', 'nowhere'
    else:
        raise AssertionError(case)
    write_manifest(train, [ok_entry] + lines)
    return source, code, severity, target.name


CASES = ['truncated_wav', 'random_bytes_mp3', 'zero_length', 'nan_float_wav', 'all_zero', 'missing_file',
         'bad_json_line', 'missing_fields_line', 'missing_sidecar', 'invalid_sidecar', 'sidecar_missing_fields',
         'empty_description', '8khz', '6_channels', '10_hour_claim', 'duration_mismatch', 'directory',
         'duplicate_across_splits', 'duplicate_content', 'clipping', 'missing_manifest']


@pytest.mark.parametrize('case', CASES)
def test_each_broken_input_gets_its_specific_issue(tmp_path, good_clip, case):
    source, code, severity, name = _build(case, tmp_path, good_clip)
    report = validate_datasource(source, sample_rate=32000, channels=1, segment_duration=1.0, workers=1)
    issues = [issue for issue in getattr(report, severity) if issue.code == code]
    assert issues, f"{case}: expected {severity[:-1]} {code}, got errors={report.codes()} " \
                   f"warnings={report.codes('warnings')}"
    assert any(name in issue.path or name in issue.message for issue in issues)
    # The good clips carry no error: only the broken input is blamed.
    assert all('ok.wav' not in issue.path for issue in report.errors)
    if severity == 'warnings':
        assert report.ok
    else:
        with pytest.raises(DataError) as caught:
            report.raise_if_errors()
        assert name in str(caught.value) and code in str(caught.value) and 'Fix' in str(caught.value)


def test_bad_line_names_manifest_and_line_number(tmp_path, good_clip):
    source, *_ = _build('bad_json_line', tmp_path, good_clip)
    report = validate_datasource(source, segment_duration=1.0)
    (issue,) = report.errors
    assert issue.line == 2 and issue.path.endswith('data.jsonl') and 'line 2 of' in issue.message


def test_warnings_say_what_the_dataset_does(tmp_path, good_clip):
    for case, phrase in (('8khz', 'resampled to 32000 Hz'), ('6_channels', 'averaged down to 1')):
        source, code, _, _ = _build(case, tmp_path / case, good_clip)
        report = validate_datasource(source, segment_duration=1.0)
        assert any(phrase in issue.message for issue in report.warnings if issue.code == code)
    source, *_ = _build('6_channels', tmp_path / 'stereo_target', good_clip)
    report = validate_datasource(source, channels=2, segment_duration=1.0)
    assert report.ok and any('cut to its first 2' in issue.message for issue in report.warnings)
    stereo = write_tone(tmp_path / 'stereo.wav', 1.0, channels=2)
    write_sidecar(stereo)
    report = validate_manifest(write_manifest(tmp_path / 'st.jsonl', [entry(stereo, 1.0)]), channels=4,
                               segment_duration=1.0)
    assert report.codes() == ['channel_mismatch']  # 2 -> 4 channels raises inside AudioCraft: an error


def test_short_clips_warn_about_padding_and_suggest_a_segment(tmp_path, good_clip):
    _, first = good_clip(tmp_path, 'a.wav', seconds=2.0)
    _, second = good_clip(tmp_path, 'b.wav', seconds=2.0, frequency=300)
    report = validate_manifest(write_manifest(tmp_path / 'data.jsonl', [first, second]), segment_duration=30.0)
    assert report.ok and report.codes('warnings') == ['short_clip', 'short_clip']
    message = report.warnings[0].message
    assert 'padded with 28.0 s' in message and 'masked from the loss' in message
    assert 'dataset.segment_duration=2' in message


def test_all_broken_inputs_at_once_never_raise(tmp_path, good_clip):
    """One dataset holding every broken case: validation returns a report naming each file, no traceback."""
    expected = {}
    all_lines = []
    for case in CASES:
        if case in ('missing_manifest', 'bad_json_line', 'missing_fields_line', 'duplicate_across_splits'):
            continue
        folder = tmp_path / case
        _, code, _, name = _build(case, folder, good_clip)
        all_lines += [line for line in (folder / 'train' / 'data.jsonl').read_text().splitlines()[1:]]
        expected[name] = code
    train = write_manifest(tmp_path / 'all' / 'train' / 'data.jsonl', all_lines + ['not json at all'])
    report = validate_datasource({'train': str(train)}, segment_duration=1.0)
    found = {(Path(issue.path).name, issue.code) for issue in report.errors + report.warnings}
    for name, code in expected.items():
        if code != 'duplicate_across_splits':
            assert (name, code) in found, (name, code)
    assert ('data.jsonl', 'bad_manifest_line') in found
    table = report.summary_table()
    assert 'train' in table and 'corrupt_audio' in table and 'Errors (' in table


def test_clean_dataset_has_no_errors(tmp_path, good_clip):
    train = [good_clip(tmp_path, f't{index}.wav', seconds=3.0, frequency=200 + 40 * index)[1] for index in range(4)]
    valid = [good_clip(tmp_path, f'v{index}.flac', seconds=3.0, frequency=500 + 40 * index)[1] for index in range(2)]
    datasource = {'max_sample_rate': 48000, 'train': str(write_manifest(tmp_path / 'train' / 'data.jsonl', train)),
                  'valid': str(write_manifest(tmp_path / 'valid' / 'data.jsonl', valid)),
                  'evaluate': str(tmp_path / 'valid'), 'generate': str(tmp_path / 'valid')}
    report = validate_datasource(datasource, segment_duration=3.0)
    assert report.errors == [] and report.warnings == []
    report.raise_if_errors()
    assert report.splits['train'].entries == 4 and sum(report.splits['train'].durations) == pytest.approx(12.0)
    assert 'Errors: none' in report.summary_table()
    fast = validate_datasource(datasource, segment_duration=3.0, fast=True)
    assert fast.ok and 'headers only' in fast.summary_table()


def _validate_as_nobody(manifest: str, queue) -> None:
    os.setgid(65534)
    os.setuid(65534)
    report = validate_datasource({'train': manifest}, segment_duration=1.0, fast=True, workers=1)
    queue.put([(issue.code, issue.path, issue.message) for issue in report.errors])


def test_unreadable_file_is_reported(good_clip):
    """chmod 000 does not stop root, so as root the check runs in a forked child that drops to user `nobody`."""
    base = Path(tempfile.mkdtemp(prefix='acl_perm_'))
    try:
        os.chmod(base, 0o755)
        _, ok_entry = good_clip(base, 'ok.wav')
        locked, locked_entry = good_clip(base, 'locked.wav')
        manifest = write_manifest(base / 'data.jsonl', [ok_entry, locked_entry])
        for path in base.iterdir():
            os.chmod(path, 0o644)
        os.chmod(locked, 0)
        if os.geteuid() != 0:
            report = validate_datasource({'train': str(manifest)}, segment_duration=1.0, fast=True)
            errors = [(issue.code, issue.path, issue.message) for issue in report.errors]
        else:
            context = multiprocessing.get_context('fork')
            queue = context.Queue()
            child = context.Process(target=_validate_as_nobody, args=(str(manifest), queue))
            child.start()
            errors = queue.get(timeout=120)
            child.join(timeout=30)
        assert [(code, Path(path).name) for code, path, _ in errors] == [('unreadable', 'locked.wav')]
        assert 'chmod a+r' in errors[0][2]
    finally:
        os.chmod(base / 'locked.wav', 0o644)
        shutil.rmtree(base)
