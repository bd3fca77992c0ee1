"""The `audiocraft-lora` console script."""
import subprocess
import sys
from pathlib import Path

from audiocraft_lora import cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ('prepare', 'validate', 'import-hf', 'export', 'merge', 'generate', 'compare'):
        assert name in out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / 'audiocraft-lora'
    proc = subprocess.run([str(script), '--version'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'audiocraft-lora' in proc.stdout


def test_unavailable_subcommand_says_so(capsys, monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, 'compare', ('audiocraft_lora.not_a_module_xyz', 'x'))
    assert cli.main(['compare']) == 2
    assert 'not available' in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    from audiocraft_lora import cli
    taken = tmp_path / 'taken.wav'
    taken.write_bytes(b'x')
    for command in (['generate', '--prompts', 'trap', '--duration', '1'], ['merge', '--adapter', 'nowhere'],
                    ['export', '--adapter', 'nowhere']):
        assert cli.main(command + ['--out', str(taken)]) == 2, command
        assert f'--out {taken} is a file; give a folder' in capsys.readouterr().err, command
    assert taken.read_bytes() == b'x'
