"""The device scripts (benchmarks/gpu_*.sh) only run in sessions lent a GPU, minutes at a time: a syntax error or a
flag a benchmark doesn't take would waste one. Checked here without a GPU."""
from pathlib import Path
import re
import shutil
import subprocess

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'
SCRIPTS = sorted(BENCHMARKS.glob('gpu_*.sh'))


def _flags(text: str):
    return re.findall(r'(?<![\w-])(--[a-z][\w-]*)', text)


def _invocations(script: Path):
    """(python file, [flags]) for every `python3 benchmarks/X.py ...` command of a script (continuation lines
    joined); a command taking `$args` (or `"$@"`, in a function the loop calls) also gets the flags of the quoted
    argument lists of its `for args in` loops."""
    text = script.read_text().replace('\\\n', ' ')
    loop_flags = [flag for quoted in re.findall(r'"(--[^"]*)"', text) for flag in _flags(quoted)]
    for match in re.finditer(r'python3 (benchmarks/[\w/]+\.py)([^\n|>]*)', text):
        takes_loop = '$args' in match.group(2) or '$@' in match.group(2)  # (directly, or through a shell function)
        yield match.group(1), _flags(match.group(2)) + (loop_flags if takes_loop else [])


def test_there_are_device_scripts_and_they_share_one_setup():
    assert {p.name for p in SCRIPTS} >= {'gpu_check.sh', 'gpu_quick.sh', 'gpu_profile.sh', 'gpu_env.sh'}
    for script in SCRIPTS:
        if script.name != 'gpu_env.sh':
            assert 'source "$(dirname "$0")/gpu_env.sh"' in script.read_text(), script.name


@pytest.mark.skipif(shutil.which('bash') is None, reason='no bash')
@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_device_script_parses(script):
    proc = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s.name != 'gpu_env.sh'], ids=lambda p: p.name)
def test_every_benchmark_flag_a_device_script_passes_exists(script):
    calls = list(_invocations(script))
    assert calls, f"{script.name} runs no benchmark"
    for path, flags in calls:
        source = (BENCHMARKS.parent / path).read_text()
        for flag in flags:
            assert f"'{flag}'" in source, f"{script.name} passes {flag} to {path}, which has no such option"


def test_the_device_wheel_list_pins_what_the_tests_run_with():
    """benchmarks/gpu_wheels.txt (what make_wheels.sh fetches for the GPU image) follows the versions installed here:
    a drifted pin would run the device checks on other code than the tests."""
    from importlib import metadata
    pins = [line.split('==') for line in (BENCHMARKS / 'gpu_wheels.txt').read_text().splitlines()
            if line.strip() and not line.startswith('#')]
    assert len(pins) > 40 and any(name == 'audiocraft' for name, _ in pins)
    for name, version in pins:
        assert metadata.version(name) == version, (name, version, metadata.version(name))


@pytest.mark.skipif(shutil.which('bash') is None, reason='no bash')
def test_make_wheels_parses():
    proc = subprocess.run(['bash', '-n', str(BENCHMARKS / 'make_wheels.sh')], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s.name != 'gpu_env.sh'], ids=lambda p: p.name)
def test_every_step_time_case_a_device_script_names_exists(script):
    """A misspelt case would only show on the GPU, as one "failed" row of its table (step_time.py goes on)."""
    import sys
    sys.path.insert(0, str(BENCHMARKS))
    from step_time import CASES
    text = script.read_text().replace('\\\n', ' ')
    named = [case for listed in re.findall(r'--cases[ =]([\w,$]+)', text) if '$' not in listed
             for case in listed.split(',')]
    assert all(case in CASES for case in named), sorted(set(named) - set(CASES))


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s.name != 'gpu_env.sh'], ids=lambda p: p.name)
def test_every_cuda_check_a_device_script_names_exists(script):
    """`cuda_checks.py NAME,...` runs the checks named: a misspelt one stops it on the GPU, before any check."""
    source = (BENCHMARKS / 'cuda_checks.py').read_text()
    start = source.index('checks = {')
    known = set(re.findall(r"^\s+'(\w+)': ", source[start:source.index('\n    }\n', start)], flags=re.M))
    named = [name for listed in re.findall(r'cuda_checks\.py ([\w,]+)', script.read_text())
             for name in listed.split(',')]
    assert 'loss' in known and all(name in known for name in named), sorted(set(named) - known)
