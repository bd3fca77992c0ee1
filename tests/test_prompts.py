"""Prompt lists for generate/compare: accepted formats and the errors for everything else."""
import json

import pytest

from audiocraft_lora.errors import UserError
from audiocraft_lora.prompts import load_prompts


def _file(tmp_path, data, raw=False):
    path = tmp_path / 'evaluation_prompts.json'
    path.write_text(data if raw else json.dumps(data), encoding='utf-8')
    return path


def test_list_of_strings_objects_and_wrapper(tmp_path):
    prompts = load_prompts(prompts_file=_file(tmp_path, ['hip hop 808 beat with trap drums', 'lofi 鼓']),
                           duration=15)
    assert [(p.text, p.name, p.duration) for p in prompts] == [
        ('hip hop 808 beat with trap drums', '00_hip_hop_808_beat_with_trap_drums', 15.0),
        ('lofi 鼓', '01_lofi_鼓', 15.0)]
    prompts = load_prompts(prompts_file=_file(tmp_path, {'prompts': [
        {'description': 'trap', 'name': '808 heavy', 'duration': 10}, {'prompt': 'drill'}, {'text': 'boom bap'}]}))
    assert [(p.text, p.name, p.duration) for p in prompts] == [
        ('trap', '808_heavy', 10.0), ('drill', '01_drill', 15.0), ('boom bap', '02_boom_bap', 15.0)]
    # command-line prompts come first, then the file's
    both = load_prompts(['a beat'], _file(tmp_path, ['b beat']), duration=5)
    assert [p.text for p in both] == ['a beat', 'b beat'] and {p.duration for p in both} == {5.0}


@pytest.mark.parametrize('data, message', [
    ('{not json', 'not valid JSON'),
    ([], 'non-empty JSON list'),
    ({'items': ['a']}, 'non-empty JSON list'),
    (['ok', 3], 'entry 1: expected a string or an object'),
    ([{'name': 'x'}], "entry 0: needs exactly one non-empty text field"),
    ([{'description': 'a', 'prompt': 'b'}], 'exactly one'),
    ([{'description': 'a', 'durtion': 3}], "unknown keys ['durtion']"),
    ([{'description': 'a', 'duration': 0}], 'duration must be > 0'),
    ([{'description': 'a', 'duration': 'long'}], 'duration must be a number'),
    (['   '], 'entry 0: empty prompt'),
    ([{'description': 'a', 'name': 'same'}, {'description': 'b', 'name': 'same'}], "share the name 'same'"),
])
def test_bad_prompts_files_name_the_file_and_entry(tmp_path, data, message):
    path = _file(tmp_path, data, raw=isinstance(data, str))
    with pytest.raises(UserError, match='.*') as info:
        load_prompts(prompts_file=path)
    assert message in str(info.value)
    if 'share the name' not in message:
        assert str(path) in str(info.value)


def test_missing_file_no_prompts_and_bad_duration(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        load_prompts(prompts_file=tmp_path / 'nope.json')
    with pytest.raises(UserError, match='No prompts'):
        load_prompts()
    for duration in (0, -1, float('nan')):
        with pytest.raises(UserError, match='--duration'):
            load_prompts(['a'], duration=duration)
