"""benchmarks/step_time.py --count-only: one step on fake tensors gives the FLOPs, optimizer state and saved activations
of a real step (so its numbers at full MusicGen shapes, which no CPU can run, can be trusted), and the memory levers do
what they claim. bf16 CPU autocast, tiny shapes."""
import contextlib
import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import step_time  # noqa: E402

CASES = 'full,lora_fast,lora_sac,lora_ckpt,hf_lora'
SHAPE = ['--scale', 'tiny', '--batch', '2', '--frames', '50', '--dtype', 'bfloat16', '--cases', CASES]


@pytest.fixture(scope='module')
def counted_and_measured():
    with contextlib.redirect_stdout(io.StringIO()):
        counted = step_time.main(['--count-only'] + SHAPE)['results']
        measured = step_time.main(['--device', 'cpu', '--warmup', '2', '--iters', '1'] + SHAPE)['results']
    return counted, measured


def test_fake_step_counts_what_a_real_step_does(counted_and_measured):
    counted, measured = counted_and_measured
    assert set(counted) == set(measured) == set(CASES.split(','))
    for case in counted:
        assert counted[case]['gflop'] == measured[case]['gflop'], case
        assert counted[case]['state_MiB'] == measured[case]['state_MiB'], case
        assert counted[case]['trainable_M'] == measured[case]['trainable_M'], case
        # the solver picks valid targets with a boolean mask, the counter with int64 indexes: a few KiB apart
        assert counted[case]['saved_MiB'] == pytest.approx(measured[case]['saved_MiB'], rel=2e-3), case


def test_memory_levers_trade_as_documented(counted_and_measured):
    counted, _ = counted_and_measured
    full, fast, sac, ckpt = (counted[c] for c in ('full', 'lora_fast', 'lora_sac', 'lora_ckpt'))
    assert fast['state_MiB'] < 0.5 * full['state_MiB']  # no gradients/Adam state for the frozen base
    assert fast['gflop'] < full['gflop']  # no frozen-weight gradient GEMMs
    assert ckpt['saved_MiB'] < sac['saved_MiB'] < fast['saved_MiB']
    # selective recomputes only cheap work; whole-layer checkpointing reruns every matmul
    assert fast['gflop'] < sac['gflop'] < fast['gflop'] + 0.25 * (ckpt['gflop'] - fast['gflop'])


def test_lora_step_launches_few_more_kernels_than_full_fine_tuning():
    """At small batches a GPU step is bound by kernel launches (AudioCraft's full fine-tune of musicgen-small: ~2,900
    per step): every op the LoRA path adds per projection costs there. Counted on musicgen-small's 24 layers at width
    16, training rows (merged-weight path), bf16 autocast: the adapters cast once per step (adapter_casts), the
    scaling inside the GEMMs, the cross-attention's key and value from one product; on CUDA the float32-out gradient
    GEMMs take more off."""
    with contextlib.redirect_stdout(io.StringIO()):
        results = step_time.main(['--device', 'cpu', '--warmup', '2', '--iters', '1', '--scale', 'small_narrow',
                                  '--batch', '1', '--frames', '150', '--dtype', 'bfloat16',
                                  '--cases', 'full,lora_fast,hf_lora'])['results']
    full, fast, hf = (results[c]['launches'] for c in ('full', 'lora_fast', 'hf_lora'))
    assert 1800 < full < 2600
    # (2,585 vs 2,173 on a CPU, 2,505 vs 2,149 as on CUDA (gpu_model.py); 2,825 with the cross-attention's key and
    # value projected apart, 3,596 with per-projection casts and scaling passes)
    assert fast <= 1.25 * full
    assert fast < 0.6 * hf


def test_cuda_graph_cases_run_on_cuda_only_and_are_counted_as_captured():
    """A CPU run refuses the CUDA-graph cases; --count-only counts their step as it runs inside the captures: under
    selective checkpointing what LoRA dropout drew is kept there (the generator can't be rewound inside a capture):
    with torch's dropout (`_tdrop`) its masks, more than the eager plan holds; with the dropout kernels (the GPU's
    default, counted as on a GPU) a seed per call; without dropout the same. (What the graphs replay, and when:
    tests/test_layer_graphs.py.)"""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        measured = step_time.main(['--device', 'cpu', '--scale', 'tiny', '--batch', '1', '--frames', '20', '--warmup',
                                   '1', '--iters', '1', '--cases', 'lora_graphed,lora_graphed_keep'])
        counted = {dropout: step_time.main(['--count-only', '--scale', 'tiny', '--batch', '2', '--frames', '50',
                                            '--dtype', 'bfloat16', '--lora-dropout', dropout,
                                            '--cases', 'lora_sac,lora_graphed_sac,lora_sac_tdrop,lora_graphed_sac_tdrop'
                                            ])['results']
                   for dropout in ('0', '0.1')}
    assert measured['results'] == {}
    assert 'lora_graphed needs a CUDA device' in out.getvalue()
    assert 'lora_graphed_keep needs a CUDA device' in out.getvalue()
    assert counted['0']['lora_graphed_sac']['peak_GiB'] == counted['0']['lora_sac']['peak_GiB']
    dropped = counted['0.1']
    assert dropped['lora_graphed_sac_tdrop']['saved_MiB'] > 1.05 * dropped['lora_sac_tdrop']['saved_MiB']
    assert dropped['lora_graphed_sac']['saved_MiB'] - dropped['lora_sac']['saved_MiB'] < 0.01  # (seeds: 8 bytes each)
    # (selective draws torch's dropout again; with the kernels the feed-forward tail is outside its checkpoint too)
    assert dropped['lora_sac']['saved_MiB'] < dropped['lora_sac_tdrop']['saved_MiB']
