"""grids/: the sweep's XPs (dora grid --dry_run and the local runner), the explorers' tables, lora_eval."""
import itertools
import json
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pytest
import treetable as tt

from helpers import ROOT

SIG = re.compile(r'\b([0-9a-f]{8})\b')


def _env(dora_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LORA_SWEEP_', 'LORA_EVAL_'))}
    env.update(AUDIOCRAFT_LORA_DORA_DIR=str(dora_dir), PYTHONUNBUFFERED='1', **extra)
    return env


def _local_grid(args, dora_dir: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'audiocraft_lora.local_grid'] + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=_env(dora_dir, **env), capture_output=True, text=True, timeout=timeout)


def _listing(stdout: str) -> dict:
    """{sig: argv} from `local_grid --dry_run`."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split('\t')
        if len(parts) == 3:
            out[parts[1]] = shlex.split(parts[2])
    return out


def _value(argv, key):
    values = [a.split('=', 1)[1] for a in argv if a.split('=', 1)[0] == key]
    return values[-1] if values else None


def test_lora_sweep_has_rank_x_lr_x_targets_and_the_data_axis(tmp_path):
    proc = _local_grid(['lora_sweep', '--dry_run'], tmp_path / 'outputs', LORA_SWEEP_DSET='audio/example',
                       LORA_SWEEP_BASE='debug', LORA_SWEEP_ARGS='dataset.segment_duration=10')
    assert proc.returncode == 0, proc.stderr[-3000:]
    xps = _listing(proc.stdout)
    assert len(xps) == 26 and '26 XPs in grid lora_sweep' in proc.stdout
    for argv in xps.values():  # recipe, dataset, base and extra overrides from the environment, on every XP
        assert argv[:4] == ['solver=musicgen/lora_small', 'dset=audio/example', 'base_model=debug',
                            'dataset.segment_duration=10']
    points = {(_value(a, 'lora.rank'), _value(a, 'lora.alpha'), _value(a, 'optim.lr'), _value(a, 'lora.targets'))
              for a in xps.values() if _value(a, 'lora.rank') is not None}
    attn = '["self_attn.in_proj", "self_attn.out_proj", "cross_attention.in_proj", "cross_attention.out_proj"]'
    expected = {(str(r), str(2 * r), lr, t) for r, lr, t in itertools.product(
        [16, 32, 64], ['5e-05', '0.0001', '0.0002'], [None, attn])}
    assert points == expected
    data = {(_value(a, 'train_subset.fraction'), _value(a, 'optim.epochs'))
            for a in xps.values() if _value(a, 'lora.rank') is None}
    assert data == {(f, e) for f in [None, '0.5', '0.25'] for e in [None, '5', '20']} - {(None, None)}


def test_dora_grid_dry_run_lists_the_same_xps(tmp_path):
    dora_dir = tmp_path / 'outputs'
    listed = _local_grid(['lora_sweep', '--dry_run'], dora_dir)
    assert listed.returncode == 0, listed.stderr[-3000:]
    dora = Path(sys.executable).parent / 'dora'
    proc = subprocess.run([str(dora), 'grid', 'lora_sweep', '--dry_run', '--no_monitoring'], cwd=ROOT,
                          env=_env(dora_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if '|' in line and SIG.search(line)]
    assert {SIG.search(r).group(1) for r in rows} == set(_listing(listed.stdout)) and len(rows) == 26
    assert not (dora_dir / 'grids' / 'lora_sweep').exists() or not any((dora_dir / 'grids' / 'lora_sweep').iterdir())


def test_unknown_dataset_is_refused_with_the_file_it_looked_for(tmp_path):
    proc = _local_grid(['lora_sweep', '--dry_run'], tmp_path / 'outputs', LORA_SWEEP_DSET='audio/nope')
    assert proc.returncode != 0
    assert 'config/dset/audio/nope.yaml' in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ explorers
class _Sheep:
    def __init__(self, folder: Path):
        self.log = None
        self.xp = type('XP', (), {'folder': folder})()


def _history(fade: bool):
    history = [
        {'train': {'ce': 6.0, 'ppl': 400.0, 'duration': 120.0}, 'valid': {'ce': 5.5, 'ppl': 250.0}},
        {'train': {'ce': 5.0, 'ppl': 150.0, 'duration': 60.0}, 'valid': {'ce': 5.7, 'ppl': 300.0},
         'generate': {'rtf': 0.2}},
    ]
    if fade:
        history[1]['generate'].update(gen_fade_ratio_db=-7.25, gen_silence_fraction=0.125)
    return history


@pytest.mark.parametrize('fade', [True, False])
def test_sweep_explorer_shows_train_valid_best_valid_and_the_fade_diagnostic(tmp_path, fade):
    sys.path.insert(0, str(ROOT))
    from grids._explorers import LoRAExplorer
    explorer = LoRAExplorer(lambda launcher: None)
    line = explorer.process_sheep(_Sheep(tmp_path), _history(fade))
    assert line['train']['epoch'] == 2 and line['train']['ce'] == 5.0 and line['train']['duration'] == 1.0
    assert line['valid']['ce'] == 5.7 and line['valid']['best_ce'] == 5.5  # best is the lowest, not the last
    line['Meta'] = {'index': 0, 'name': 'x', 'state': 'COM', 'sig': 'abcd1234', 'sid': ''}
    table = tt.table(shorten=True, groups=[tt.group('Meta', explorer.get_grid_meta())] + explorer.get_grid_metrics())
    text = tt.treetable([line], table, colors=['0'])
    if fade:
        assert line['generate'] == {'fade_db': -7.25, 'silence': 0.125}
        assert '-7.25' in text and '0.125' in text
    else:
        assert line['generate'] == {}
        assert re.search(r'\|\s+-\s+-\s*(\x1b\[0m)?$', text.splitlines()[-1]), text  # '-' for both, no crash


# ------------------------------------------------------------------------------------------------ real runs
def test_debug_sweep_runs_here_its_table_shows_the_metrics_and_lora_eval_reruns_a_stage(tmp_path):
    dora_dir = tmp_path / 'outputs'
    proc = _local_grid(['lora_debug_sweep'], dora_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    links = sorted((dora_dir / 'grids' / 'lora_debug_sweep').iterdir())
    assert len(links) == 2
    table = proc.stdout[proc.stdout.index('generate'):]
    for link in links:  # the explorer's table shows each XP's last train CE and best valid CE
        history = json.loads((link / 'history.json').read_text())
        assert len(history) == 2
        assert f"{history[-1]['train']['ce']:.4f}" in table
        assert f"{min(e['valid']['ce'] for e in history):.4f}" in table
        if 'gen_fade_ratio_db' in history[-1].get('generate', {}):
            assert f"{history[-1]['generate']['gen_fade_ratio_db']:.2f}" in table

    # a second run skips the finished XPs
    again = _local_grid(['lora_debug_sweep'], dora_dir)
    assert again.returncode == 0 and again.stdout.count('finished, skipped') == 2

    # lora_eval: evaluate + generate per finished XP, from its best adapter
    listed = _local_grid(['lora_eval', '--dry_run'], dora_dir, LORA_EVAL_GRID='lora_debug_sweep')
    assert listed.returncode == 0, listed.stderr[-3000:]
    evals = _listing(listed.stdout)
    assert len(evals) == 4
    assert {(_value(a, 'continue_from'), _value(a, 'execute_only')) for a in evals.values()} == {
        (f'"//sig/{link.name}"', f'"{stage}"') for link in links for stage in ('evaluate', 'generate')}
    proc = _local_grid(['lora_eval', 'lora_eval_evaluate', '0'], dora_dir, LORA_EVAL_GRID='lora_debug_sweep')
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [sig for sig in evals if (dora_dir / 'xps' / sig / 'history.json').exists()]
    assert len(done) == 1
    history = json.loads((dora_dir / 'xps' / done[0] / 'history.json').read_text())
    assert list(history[0]) == ['evaluate'] and history[0]['evaluate']['ce'] > 0
    assert f"{history[0]['evaluate']['ce']:.4f}" in proc.stdout  # LoRAEvalExplorer's table


def test_sweep_base_given_as_a_relative_folder_is_recorded_absolute(tmp_path, monkeypatch):
    from grids import _sweep
    (tmp_path / 'local' / 'musicgen-small').mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith('LORA_SWEEP_')]:
        monkeypatch.delenv(key)
    monkeypatch.setenv('LORA_SWEEP_BASE', 'local/musicgen-small')  # XPs run in their own folders: not relative
    assert _sweep.base_args('lora_small')[-1] == f"base_model={tmp_path / 'local' / 'musicgen-small'}"
    monkeypatch.setenv('LORA_SWEEP_BASE', 'facebook/musicgen-small')  # a hub id stays as it is
    assert _sweep.base_args('lora_small')[-1] == 'base_model=facebook/musicgen-small'
