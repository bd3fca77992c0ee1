"""A training step that runs out of GPU memory stops with the next leaner checkpointing plan to try (the OOM is
injected with the `oom@train_step` fault, since the suite has no GPU)."""
import pytest

from audiocraft_lora.faults import ENV as FAULT
from audiocraft_lora.plans import out_of_memory_advice
from audiocraft_lora.speed import SpeedSettings
from helpers import DEBUG_ARGS, run_dora


@pytest.mark.parametrize('settings, suggested', [
    ({}, 'lora.activation_checkpointing=selective'),
    ({'activation_checkpointing': 'selective', 'checkpoint_fraction': 0.5}, 'lora.activation_checkpointing=selective'),
    ({'activation_checkpointing': 'selective'},
     'lora.activation_checkpointing=torch lora.checkpoint_fraction=0.5 lora.checkpoint_rest=selective'),
    ({'activation_checkpointing': 'torch', 'checkpoint_fraction': 0.5},
     'lora.activation_checkpointing=torch lora.checkpoint_fraction=0.5 lora.checkpoint_rest=selective'),
    ({'activation_checkpointing': 'torch', 'checkpoint_fraction': 0.5, 'checkpoint_rest': 'selective'},
     'lora.activation_checkpointing=torch lora.checkpoint_fraction=1.0'),
    ({'activation_checkpointing': 'torch'}, None),
])
def test_the_advice_climbs_the_memory_ladder(settings, suggested):
    advice = out_of_memory_advice(SpeedSettings(**settings), 16, 30.0, 'CUDA out of memory. Tried to allocate 2 GiB')
    assert 'dataset.batch_size=16' in advice and 'lower dataset.batch_size (now 16' in advice
    if suggested is None:
        assert 'Rerun the same command with' not in advice  # nothing leaner left but a smaller batch
    else:
        rerun = advice.split('Rerun the same command with `', 1)[1].split('`', 1)[0]
        assert suggested in rerun, rerun


def test_an_out_of_memory_step_stops_the_run_with_the_advice(dora_dir, monkeypatch):
    monkeypatch.setenv(FAULT, 'oom@train_step:epoch=1,step=0')
    proc = run_dora(DEBUG_ARGS, dora_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.split('error: ', 1)[1]
    assert 'ran out of memory in a training step (CUDA out of memory.' in error
    # the recipes' LoRA dropout (0.05) on the fast path: first keep no dropout masks
    assert 'Rerun the same command with `lora.dropout_replay=True`' in error
    assert 'Traceback' not in proc.stderr


def test_with_lora_dropout_the_first_rung_replays_the_masks():
    error = 'CUDA out of memory. Tried to allocate 2 GiB'
    advice = out_of_memory_advice(SpeedSettings(), 16, 30.0, error, lora_dropout=True)
    assert advice.split('Rerun the same command with `', 1)[1].startswith('lora.dropout_replay=True`')
    replayed = out_of_memory_advice(SpeedSettings(dropout_replay=True), 16, 30.0, error, lora_dropout=True)
    assert 'Rerun the same command with `lora.activation_checkpointing=selective' in replayed
    plain_path = out_of_memory_advice(SpeedSettings(fast_path=False), 16, 30.0, error, lora_dropout=True)
    assert 'dropout_replay' not in plain_path  # the replay is the fast path's


def test_with_cuda_graphs_of_the_layers_turning_them_off_comes_first():
    error = 'CUDA out of memory. Tried to allocate 2 GiB'
    advice = out_of_memory_advice(SpeedSettings(), 16, 30.0, error, lora_dropout=True, graphs=True)
    assert advice.split('rerun the same command with `', 1)[1].startswith('lora.graph_layers=false`')
    assert advice.index('lora.graph_layers=false') < advice.index('lora.dropout_replay=True')
    assert 'graph_layers' not in out_of_memory_advice(SpeedSettings(), 16, 30.0, error, lora_dropout=True)
