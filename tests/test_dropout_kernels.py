"""LoRA dropout drawn inside the rank-r products (dropout_kernels, `lora.dropout_kernel`). The Triton kernels run on
CPU tensors under Triton's interpreter (a subprocess with TRITON_INTERPRET=1: the kernels are defined at import), and
on a GPU in benchmarks/cuda_checks.py; the rest (settings, the fall-backs, the estimates) in-process."""
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from audiocraft_lora import dropout_kernels
from audiocraft_lora.errors import LoRAConfigError
from audiocraft_lora.fast_lora import FastLoraLinear, low_rank_linear
from audiocraft_lora.speed import SpeedSettings, apply_to_model, has_fast_dropout

from helpers import debug_lora_lm

_INTERPRETED = r'''
import torch
from audiocraft_lora import dropout_kernels as dk, recompute
from audiocraft_lora.fast_lora import low_rank_linear
from audiocraft_lora.speed import SpeedSettings, apply_to_model
import sys
sys.path.insert(0, 'tests')
from helpers import OpsSeen, debug_lora_lm, lora_step
import collections

# 1. the GPU's check as it is: each kernel against float32 products with the kernels' own mask (dA's programs over
# several row blocks), each kernel's mask read back exactly, the keep rate, independence of neighbours and seeds;
# with FUSED_BACKWARD, whose check adds masked_backward_'s to the rest
dk.FUSED_BACKWARD = True
assert dk._disagreement(torch.device('cpu')) is None, dk._disagreement(torch.device('cpu'))
dk.FUSED_BACKWARD = False

# 2. one projection under bf16 autocast against autograd on y = x W^T + b + s ((keep * x / (1 - p)) A^T) B^T: an
# input wider than the output (u B^T added to x W^T) and narrower ([x | u] [W | B]^T in one GEMM, as linear1)
from audiocraft_lora.fast_lora import _beside_pays
for N, IN, OUT, R, p, s in ((50, 40, 24, 8, 0.25, 0.7), (50, 24, 40, 8, 0.25, 0.7)):
    torch.manual_seed(0)
    x = torch.randn(3, N, IN, requires_grad=True)
    w, bias = torch.randn(OUT, IN), torch.randn(OUT)
    A, B = torch.randn(R, IN, requires_grad=True), torch.randn(OUT, R, requires_grad=True)
    g = torch.randn(3, N, OUT)
    saved = []
    torch.manual_seed(1)
    with OpsSeen() as seen, torch.autocast('cpu', dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = low_rank_linear(x, w, bias, A, B, s, p, kernel=True)
    assert ('dropout_rank_product_beside' in seen.names) == _beside_pays(IN, OUT, R) == (IN < OUT), seen.names
    y.backward(g)
    assert not any(t.dtype == torch.bool for t in saved), 'a mask was saved'
    assert sum(t.numel() for t in saved if t.shape[-1] == IN and t.numel() >= 3 * N * IN) == 3 * N * IN, \
        'more than x saved at its size'
    torch.manual_seed(1)
    keep = dk.keep_mask(dk.draw_seed(torch.device('cpu')), 3 * N, IN, p).view(3, N, IN) * dk.keep_scale(p)
    assert 0 < (keep == 0).float().mean() < 0.5
    low = lambda t: t.detach().bfloat16().float().requires_grad_()
    xb, Ab, Bb = low(x), low(A), low(B)
    ref = xb @ low(w).t() + low(bias) + s * ((xb * keep) @ Ab.t()) @ Bb.t()
    ref.backward(g.bfloat16().float())
    for name, got, want in (('y', y, ref), ('dx', x.grad, xb.grad), ('dA', A.grad, Ab.grad), ('dB', B.grad, Bb.grad)):
        error = float((got.float() - want).abs().max() / want.abs().max())
        assert error < 1e-2, (IN, OUT, name, error)
    assert A.grad.dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):  # each call draws its own seed: another mask
        again = low_rank_linear(x, w, bias, A, B, s, p, kernel=True)
    assert not torch.equal(again, y)
    # masked_backward_ (FUSED_BACKWARD): dx and dA of masked_update_ and rank_grad, bit for bit
    grads = x.grad, A.grad, B.grad
    x.grad = A.grad = B.grad = None
    dk.FUSED_BACKWARD = True
    torch.manual_seed(1)
    with OpsSeen() as seen, torch.autocast('cpu', dtype=torch.bfloat16):
        low_rank_linear(x, w, bias, A, B, s, p, kernel=True).backward(g)
    dk.FUSED_BACKWARD = False
    assert 'dropout_masked_backward' in seen.names and 'dropout_rank_grad' not in seen.names, seen.names
    assert all(torch.equal(a, b) for a, b in zip((x.grad, A.grad, B.grad), grads)), IN

# 3. a debug LM step with the kernels: selective checkpointing and the captures' plan give the plain step bit for
# bit (the seeds drawn again in the recompute, or kept), with rank_product's output kept (never run in backward),
# and no mask saved; torch's dropout saves masks
codes = torch.randint(0, 32, (2, 4, 40), generator=torch.Generator().manual_seed(0))
results = {}

def bool_saves(lm, step=lora_step):
    bools = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: bools.append(t.dtype == torch.bool) or t, lambda t: t):
        out = step(lm, codes)
    return sum(bools), out

lm = debug_lora_lm(dropout=0.0)
apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)
undropped = bool_saves(lm)[0]  # (the loss's and attention's own)
for plan in ('none', 'selective', 'captured', 'torch'):
    lm = debug_lora_lm(dropout=0.25, rank=8)  # (rank 8: [x | u]'s rows stay aligned, _beside_pays)
    apply_to_model(lm, SpeedSettings(activation_checkpointing='selective' if plan == 'captured' else plan), True,
                   torch.bfloat16)
    count = OpsSeen()
    with count:
        if plan == 'captured':
            with recompute.captured_plan(lm):
                saves, results[plan] = bool_saves(lm)
        else:
            saves, results[plan] = bool_saves(lm)
    assert saves == undropped, (plan, 'a mask was saved')
    results[plan + '_calls'] = collections.Counter(count.names)
for plan in ('selective', 'captured', 'torch'):
    logits, ce, grads = results[plan]
    assert torch.equal(logits, results['none'][0]) and torch.equal(ce, results['none'][1]), plan
    assert all(torch.equal(p, q) for p, q in zip(grads, results['none'][2])), plan
calls = results['none_calls']
layers = len(lm.transformer.layers)
products = calls['dropout_rank_product'] + calls['dropout_rank_product_beside']
assert products == calls['dropout_rank_grad'] == calls['dropout_masked_update'] == 4 * layers, calls
assert calls['dropout_rank_product_beside'] == layers  # (linear1, narrower in than out: [x | u] [W | B]^T)
# selective keeps the [N, r] products (a matmul's output) and makes [x | u] again (an input's size), after the norm
assert results['selective_calls']['dropout_rank_product'] == calls['dropout_rank_product'], 'recomputed under selective'
assert results['selective_calls']['dropout_rank_product_beside'] == 2 * layers
assert results['torch_calls']['dropout_rank_product'] == 2 * calls['dropout_rank_product']
assert 'native_dropout' not in calls
lm = debug_lora_lm(dropout=0.25, rank=8)
apply_to_model(lm, SpeedSettings(dropout_kernel='false'), True, torch.bfloat16)
saves, torch_dropout = bool_saves(lm)
assert saves > undropped
assert not torch.equal(torch_dropout[1], results['none'][1])  # (another random stream)

# selective runs the feed-forward tail outside its checkpoint with the kernels' dropout (linear1 one GEMM over
# [x | u], linear2 saving its input itself), not with torch's
for kernel, fits in (('auto', True), ('false', False)):
    lm = debug_lora_lm(dropout=0.25, rank=8)
    apply_to_model(lm, SpeedSettings(activation_checkpointing='selective', dropout_kernel=kernel), True,
                   torch.bfloat16)
    x = torch.randn(2, 40, lm.dim, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert all(recompute._tail_fits(layer, x) == fits for layer in lm.transformer.layers), kernel
print('OK')
'''


def test_kernels_and_the_fast_path_with_them_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', _INTERPRETED], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith('OK'), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_threshold_and_scale_keep_the_expectation():
    assert dropout_kernels.threshold(0.05) == 3277 and dropout_kernels.threshold(0.0) == 0
    assert dropout_kernels.keep_scale(0.05) == 65536 / (65536 - 3277)
    assert dropout_kernels.keep_scale(0.0) == 1.0
    assert dropout_kernels.threshold(0.999999) == 65535


def test_x_beside_u_only_where_its_rows_stay_aligned():
    """`[x | u] [W | B]^T` (linear1 with the kernels' dropout) only where rows in + r apart stay 16-byte aligned in
    bf16: a rank that is not a multiple of 8 adds `u B^T` to the base product instead (same values, another path)."""
    from audiocraft_lora.fast_lora import _beside_pays
    assert _beside_pays(1024, 4096, 16) and _beside_pays(1024, 4096, 8)
    assert not _beside_pays(1024, 4096, 12) and not _beside_pays(1024, 4096, 1)
    assert not _beside_pays(4096, 1024, 16)  # (linear2: input wider than the output)


def test_off_the_gpu_the_kernel_flag_is_torch_dropout_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 16, requires_grad=True)
    w, a, b = torch.randn(12, 16), torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    outs = []
    for kernel in (False, True):
        torch.manual_seed(3)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = low_rank_linear(x, w, None, a, b, 0.5, 0.3, kernel=kernel)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), [x, a, b])))
    assert all(torch.equal(p, q) for p, q in zip(*outs))


def test_setting_marks_the_dropout_projections_and_the_check_sets_them_back_off_the_gpu(caplog):
    with pytest.raises(LoRAConfigError, match='lora.dropout_kernel'):
        SpeedSettings(dropout_kernel='sometimes').validate()
    lm = debug_lora_lm(dropout=0.1)
    info = apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)
    linears = [m for m in lm.modules() if isinstance(m, FastLoraLinear)]
    assert info['dropout_kernel'] == len(linears) > 0 and all(m._lora_dropout_kernel for m in linears)
    assert not has_fast_dropout(lm)  # (nothing for dropout_replay to do)
    with pytest.raises(LoRAConfigError, match='lora.dropout_kernel=true.*cpu'):
        dropout_kernels.check(lm, 'cpu', required=True)
    assert dropout_kernels.check(lm, 'cpu') is False
    assert not any(m._lora_dropout_kernel for m in linears) and has_fast_dropout(lm)
    for settings in (SpeedSettings(dropout_kernel='false'), SpeedSettings(compile='aot_eager')):
        lm = debug_lora_lm(dropout=0.1)
        assert 'dropout_kernel' not in apply_to_model(lm, settings, True, torch.bfloat16)
        assert dropout_kernels.check(lm, 'cpu') is None
    lm = debug_lora_lm(dropout=0.0)
    apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)
    assert dropout_kernels.check(lm, 'cpu') is None  # (no dropout: nothing asks for them)
    lm = debug_lora_lm(dropout=0.1)  # float32 compute (no autocast): the kernels take bf16/fp16 only
    assert 'dropout_kernel' not in apply_to_model(lm, SpeedSettings(), False, torch.float32)
    assert has_fast_dropout(lm)  # (so the memory plan still offers dropout_replay)


def test_ranks_beyond_the_kernels_keep_torch_dropout():
    from audiocraft_lora import base_models
    from audiocraft_lora.lora import LoRASettings, inject_lora
    lm = base_models.build_lm(base_models.load_lm_package(base_models.resolve_base('debug')))
    inject_lora(lm, LoRASettings(rank=dropout_kernels.MAX_RANK + 8, alpha=8, dropout=0.1))
    assert apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)['dropout_kernel'] == 0
    assert has_fast_dropout(lm) and dropout_kernels.check(lm, 'cuda') is None


def test_kernels_that_fail_their_check_fall_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(dropout_kernels, '_CHECKED', {})
    monkeypatch.setattr(dropout_kernels, '_disagreement', lambda device: 'rank_grad differs')
    with caplog.at_level(logging.WARNING):
        assert dropout_kernels.kernels_ok('cpu') is False
    assert "rank_grad differs" in caplog.text and "torch's dropout" in caplog.text
    monkeypatch.setattr(dropout_kernels, '_disagreement', lambda device: None)
    assert dropout_kernels.kernels_ok('cpu') is False  # (once per device)


def test_estimates_count_no_mask_with_the_kernels_and_the_captures_keep_only_seeds():
    """step_time --count-only (fake tensors, as on a GPU): with LoRA dropout the kernels' step is estimated at the
    memory of the step without dropout; inside the captures' plan nothing more is kept; torch's dropout keeps masks
    there."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
    import step_time
    args = SimpleNamespace(scale='xsmall', batch=2, frames=64, card=2048, device='cpu', autocast_dtype=torch.bfloat16,
                           count_only=True, lora_dropout=0.1, text_lengths=None)
    est = {case: step_time.count(case, args)['peak_GiB'] for case in
           ('lora_fast', 'lora_fast_tdrop', 'lora_sac', 'lora_sac_tdrop', 'lora_graphed_sac', 'lora_graphed_sac_tdrop')}
    args.lora_dropout = 0.0
    undropped = {case: step_time.count(case, args)['peak_GiB'] for case in ('lora_fast', 'lora_sac')}
    assert est['lora_fast'] < est['lora_fast_tdrop']
    assert abs(est['lora_fast'] - undropped['lora_fast']) < 0.02 * undropped['lora_fast']
    # (selective: the feed-forward tail outside the checkpoint with the kernels' dropout as without dropout)
    assert abs(est['lora_sac'] - undropped['lora_sac']) < 0.01 * undropped['lora_sac']
    assert est['lora_sac'] < est['lora_sac_tdrop']
    seeds = (est['lora_graphed_sac'] - est['lora_sac']) * 2 ** 30
    assert 0 <= seeds <= 8 * 512  # (an int64 a call, in the allocator's 512-byte blocks)
    assert est['lora_graphed_sac_tdrop'] > est['lora_graphed_sac'] * 1.05
