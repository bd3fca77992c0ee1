"""lora.fused_norms: the transformer's layer norms write the autocast dtype from one op. On CPU the op is ATen's norm
and its backward, so a training step is bit for bit AudioCraft's (what the swap, the op's autograd, checkpointing
and the memory estimate do is checked here); the Triton kernels CUDA runs are checked against ATen in Triton's
interpreter (a subprocess with TRITON_INTERPRET=1), and on a GPU by benchmarks/cuda_checks.py."""
import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from audiocraft_lora import base_models, fused_norms, norm_kernels
from audiocraft_lora.speed import SpeedSettings, apply_to_model

from helpers import debug_lora_lm as _lm, lora_step as _step, sample_tokens

OP = 'audiocraft_lora.layer_norm_to.default'
ADD_OP = 'audiocraft_lora.add_layer_norm_to.default'


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops run, by name, and the float32 -> bf16 casts of 3-d activations."""

    def __init__(self, low=torch.bfloat16):
        super().__init__()
        self.counts: dict = {}
        self.casts_to_bf16 = 0  # (to `low`)
        self.low = low

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and out.dtype == self.low and out.dim() == 3:
            self.casts_to_bf16 += 1
        return out


def _equal(got, expected):
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(g, e) for g, e in zip(got[2], expected[2]))


@pytest.mark.parametrize('dropout, dtype', [(0.0, torch.bfloat16), (0.1, torch.bfloat16), (0.1, torch.float16)])
def test_a_step_is_bit_for_bit_aten_s_without_the_casts(dropout, dtype):
    reference = _lm(dropout)
    apply_to_model(reference, SpeedSettings(fused_norms=False), True, dtype)
    fused = copy.deepcopy(reference)
    info = apply_to_model(fused, SpeedSettings(), True, dtype)
    layers = len(fused.transformer.layers)
    assert info['fused_norms'] == 3 * layers  # norm1, norm_cross, norm2 of every layer (not out_norm)
    assert all(type(m) is fused_norms.FusedResidualLayer for m in fused.transformer.layers)
    assert all(type(m) is nn.LayerNorm for m in reference.modules() if isinstance(m, nn.LayerNorm))
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(2))
    with _Ops(dtype) as ref_ops:
        expected = _step(reference, codes, dtype=dtype)
    with _Ops(dtype) as ops:
        got = _step(fused, codes, dtype=dtype)
    _equal(got, expected)
    # norm1 alone; the residual adds in front of norm_cross and norm2 with them
    assert ops.counts.get(OP) == layers and ops.counts.get(ADD_OP) == 2 * layers
    assert OP not in ref_ops.counts and ADD_OP not in ref_ops.counts
    # (not the first layer's norm1: its input, the frozen embeddings' sum, needs no gradient)
    assert ops.counts.get('audiocraft_lora.layer_norm_to_backward.default') == layers - 1
    assert ops.counts.get('audiocraft_lora.add_layer_norm_to_backward.default') == 2 * layers
    # (ATen's norm runs inside the ops, below this mode: only out_norm's and the conditioner's are seen)
    assert ref_ops.counts['aten.native_layer_norm.default'] - ops.counts['aten.native_layer_norm.default'] \
        == 3 * layers
    # gone: the casts of the norms' float32 outputs (norm2's by linear1, norm1's and norm_cross's by
    # lora.attention_in_autocast_dtype's hook) and of the branches' gradients; two residual adds a layer, and
    # autograd's sums of the stream's gradients in front of them
    assert ref_ops.casts_to_bf16 - ops.casts_to_bf16 >= 5 * layers, (ref_ops.casts_to_bf16, ops.casts_to_bf16)
    assert ref_ops.counts['aten.add.Tensor'] - ops.counts['aten.add.Tensor'] >= 4 * layers, \
        (ref_ops.counts['aten.add.Tensor'], ops.counts['aten.add.Tensor'])


def test_selective_checkpointing_recomputes_the_op_with_the_same_values():
    reference = _lm(0.1)
    apply_to_model(reference, SpeedSettings(fused_norms=False, activation_checkpointing='selective'), True,
                   torch.bfloat16)
    fused = _lm(0.1)
    apply_to_model(fused, SpeedSettings(activation_checkpointing='selective'), True, torch.bfloat16)
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(5))
    expected = _step(reference, codes)
    with _Ops() as ops:
        got = _step(fused, codes)
    _equal(got, expected)
    layers = len(fused.transformer.layers)
    # forward, then each layer's three norms again in backward
    assert ops.counts[OP] == 2 * layers and ops.counts[ADD_OP] == 4 * layers


def test_fake_tensors_and_the_memory_estimate():
    """The memory estimate runs the step on fake tensors: the op has a fake kernel, and the estimate of the fused
    step is no more than AudioCraft's norms' (tests/test_memory_plan.py checks it against a real step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, 16)
        out, mean, rstd = fused_norms.layer_norm_to(x, torch.empty(16), torch.empty(16), 1e-5, torch.bfloat16)
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and mean.shape == rstd.shape == (2, 7, 1)
    from audiocraft_lora.memory_estimate import StepShape, estimate_step
    peaks = []
    for fused in (False, True):
        lm = _lm(0.0)
        apply_to_model(lm, SpeedSettings(fused_norms=fused), True, torch.bfloat16)
        peaks.append(estimate_step(lm, None, StepShape(batch=2, frames=40), torch.bfloat16).peak)
    assert 0 < peaks[1] <= peaks[0], peaks


def test_aten_s_norm_where_the_op_does_not_apply(caplog):
    lm = _lm(0.0)
    apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)
    norm = lm.transformer.layers[0].norm2
    assert isinstance(norm, fused_norms.FusedLayerNorm) and isinstance(norm, nn.LayerNorm)
    x = torch.randn(2, 5, norm.normalized_shape[0], requires_grad=True)
    with _Ops() as ops:
        plain = norm(x)  # no autocast: float32, nn.LayerNorm's forward
    assert plain.dtype == torch.float32 and OP not in ops.counts
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = norm(x)
        assert low.dtype == torch.bfloat16 and torch.equal(low, plain.to(torch.bfloat16))
        with torch.no_grad(), _Ops() as ops:  # validation, generation: AudioCraft's norm
            assert norm(x).dtype == torch.float32 and OP not in ops.counts
        with _Ops() as ops:  # a bf16 stream (not AudioCraft's float32 one): AudioCraft's norm
            norm(x.detach().to(torch.bfloat16).requires_grad_())
        assert OP not in ops.counts and 'aten.native_layer_norm.default' in ops.counts
        norm.weight.requires_grad_(True)  # a trainable norm keeps AudioCraft's norm (its weight gets a gradient)
        with _Ops() as ops:
            trained = norm(x)
        assert trained.dtype == torch.float32 and OP not in ops.counts
    trained.sum().backward()
    assert norm.weight.grad is not None
    # the swap keeps names, state dict and deepcopy; remove swaps back
    assert set(lm.state_dict()) == set(_lm(0.0).state_dict())
    assert type(copy.deepcopy(lm).transformer.layers[1].norm1) is fused_norms.FusedLayerNorm
    assert fused_norms.remove(lm) == 3 * len(lm.transformer.layers)
    assert not any(isinstance(m, fused_norms.FusedLayerNorm) for m in lm.modules())


@pytest.mark.parametrize('settings, autocast', [
    (dict(fast_path=False, base_dtype='float32'), True),  # peft's plain path casts its LoRA input to float32
    (dict(), False),  # nothing to cast to
    (dict(compile='aot_eager'), True),  # torch.compile fuses the norms itself
    (dict(fused_norms=False), True),
])
def test_left_alone(settings, autocast):
    lm = _lm(0.1)
    info = apply_to_model(lm, SpeedSettings(**settings), autocast, torch.bfloat16)
    assert 'fused_norms' not in info
    assert not any(isinstance(m, fused_norms.FusedLayerNorm) for m in lm.modules())


def test_a_failing_kernel_check_warns_and_keeps_aten(caplog, monkeypatch):
    """Where the Triton kernels can't run (here: CPU tensors outside the interpreter), the check says so once and
    the op takes ATen's kernels."""
    monkeypatch.setattr(norm_kernels, '_CHECKED', {})
    monkeypatch.setattr(norm_kernels, 'triton_forward', _raise)
    with caplog.at_level(logging.WARNING, logger='audiocraft_lora.norm_kernels'):
        assert norm_kernels.triton_ok(torch.device('cpu')) is False
        assert norm_kernels.triton_ok(torch.device('cpu')) is False
    assert len([r for r in caplog.records if 'ATen' in r.getMessage()]) == 1
    assert 'no triton here' in caplog.text


def _raise(*args, **kwargs):
    raise RuntimeError('no triton here')


_INTERPRETED = r'''
import json, torch
from audiocraft_lora import norm_kernels as nk
torch.manual_seed(0)
report = {'ok_cpu': nk.triton_ok(torch.device('cpu')), 'widths': {}}
CUDA_NAN = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # what CUDA's kernels produce
for width in (48, 333, 1024, 1536):
    x = torch.randn(3, 13, width) * 3 + 1
    x[0, 0] = float('nan')  # a NaN row stays NaN
    x[0, 0, 1] = CUDA_NAN
    x[1, :4] = 1 + 1e-4 * torch.randn(4, width)  # nearly constant rows: there eps counts
    x[1, 4] = 0.5  # a constant row: the norm is the bias
    branch = torch.randn(3, 13, width).to(torch.bfloat16)
    w, b = torch.randn(width), torch.randn(width)
    # (a part along the normalized input: the backward's `xhat * c1` term counts)
    g = (torch.nn.functional.layer_norm(x, (width,)) + torch.randn(3, 13, width)).to(torch.bfloat16)
    gh = torch.randn(3, 13, width)
    gh[0, 0, 2] = CUDA_NAN  # rounded by hand to bf16, a NaN must stay NaN (not -0.0)
    row = {}
    for name, y in (('norm', None), ('add', branch)):
        h, wide, mean, rstd = nk.triton_forward(x, y, w, b, 1e-5, torch.float32)
        ref_h, ref, ref_mean, ref_rstd = nk.aten_forward(x, y, w, b, 1e-5, torch.float32)
        out = {'h': h is None if y is None else torch.equal(h[1:], ref_h[1:]),  # the same float32 add
               'fp32': float((wide[1:] - ref[1:]).abs().max() / ref[1:].abs().max()),
               'constant_row': torch.equal(wide[1, 4], b) if y is None else True,  # (the norm: the bias)
               'stats': float(max((mean[1:] - ref_mean[1:]).abs().max(),
                                  ((rstd[1:] - ref_rstd[1:]) / ref_rstd[1:]).abs().max())),
               'nan_row': bool(wide[0, 0].isnan().all())}
        for low, dtype in (('bf16', torch.bfloat16), ('fp16', torch.float16)):
            _, narrow, _, _ = nk.triton_forward(x, y, w, b, 1e-5, dtype)
            # the float32 values rounded once, to nearest even, as `.to(dtype)` rounds them (NaN kept)
            out[low] = (narrow.dtype == dtype and torch.equal(narrow[1:], wide[1:].to(dtype))
                        and bool(narrow[0, 0].isnan().all()))
        stream = x if y is None else ref_h
        for low, dtype in (('bf16', torch.bfloat16), ('fp16', torch.float16)):
            grads = (None, None) if y is None else (gh, dtype)
            dx, dy = nk.triton_backward(g.to(dtype), stream, w, ref_mean, ref_rstd, *grads)
            ref_dx, ref_dy = nk.aten_backward(g.to(dtype), stream, w, ref_mean, ref_rstd, *grads)
            # row by row: the nearly constant rows' gradients are ~1000x the others'
            scale = ref_dx[1:].abs().amax(-1, keepdim=True)
            out['backward_' + low] = float(((dx[1:] - ref_dx[1:]).abs() / scale).max())
            out['backward_dtype'] = str(dx.dtype)
            # the branch's gradient: the stream's, rounded once; CUDA's NaN stays NaN
            out['dy_' + low] = dy is None if y is None else (
                dy.dtype == dtype and bool(dy[0, 0].isnan().all()) and torch.equal(dy[1:], dx[1:].to(dtype)))
        row[name] = out
    report['widths'][width] = row
print(json.dumps(report))
'''


_INTERPRETED_STEP = r'''
import copy, json, torch
from audiocraft.modules.conditioners import ConditioningAttributes
from audiocraft.solvers.musicgen import MusicGenSolver
from audiocraft_lora import base_models, fused_norms, norm_kernels
from audiocraft_lora.lora import LoRASettings, inject_lora, lora_parameters
from audiocraft_lora.speed import SpeedSettings, apply_to_model
# what the ops run on CUDA (Triton, behind the per-width check), run here on CPU tensors by the interpreter
for name, kernel in (('layer_norm_to', fused_norms._layer_norm_to_cuda),
                     ('layer_norm_to_backward', fused_norms._layer_norm_to_backward_cuda),
                     ('add_layer_norm_to', fused_norms._add_layer_norm_to_cuda),
                     ('add_layer_norm_to_backward', fused_norms._add_layer_norm_to_backward_cuda)):
    torch.library.register_kernel('audiocraft_lora::' + name, 'cpu', kernel)
torch.manual_seed(0)
lm = base_models.build_lm(base_models.load_lm_package(base_models.resolve_base('debug')))
inject_lora(lm, LoRASettings(rank=4, alpha=8, init='random', dropout=0.0))
lm.train()
fused = copy.deepcopy(lm)
apply_to_model(lm, SpeedSettings(fused_norms=False), True, torch.bfloat16)
apply_to_model(fused, SpeedSettings(), True, torch.bfloat16)
codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(2))
attributes = [ConditioningAttributes(text={'description': 'trap beat'}) for _ in range(2)]
report = {}
for name, model in (('aten', lm), ('triton', fused)):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        conditions = model.condition_provider(model.condition_provider.tokenize(attributes))
        out = model.compute_predictions(codes, [], conditions)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
    grads = torch.autograd.grad(ce, list(lora_parameters(model).values()))
    report[name] = (float(ce), grads)
(ce_a, grads_a), (ce_t, grads_t) = report['aten'], report['triton']
print(json.dumps({'ce': [ce_a, ce_t], 'checked': {str(k): ok for k, ok in norm_kernels._CHECKED.items()},
                  'grads': max(float((a - t).abs().max() / a.abs().max()) for a, t in zip(grads_a, grads_t))}))
'''


def test_a_step_through_the_triton_kernels_in_the_interpreter():
    """The ops' CUDA kernels (Triton, behind the per-width check) registered as their CPU kernels and run by the
    interpreter: a bf16 step of the debug LM gives AudioCraft's loss and adapter gradients up to bf16 rounding (the
    kernels sum in another order), and the kernels were checked at the LM's own width."""
    pytest.importorskip('triton', reason="Triton comes with torch's Linux CUDA wheels; without it the op is ATen's")
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', _INTERPRETED_STEP], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    width = base_models.build_lm(base_models.load_lm_package(base_models.resolve_base('debug'))).dim
    assert report['checked'] == {f"(device(type='cpu'), {width})": True}  # (False: the step ran ATen's kernels)
    assert abs(report['ce'][0] - report['ce'][1]) < 1e-4 * abs(report['ce'][0]), report  # (bit-equal here)
    assert report['grads'] < 1e-3, report


def test_no_check_inside_a_cuda_graph_capture(monkeypatch):
    """A check syncs: a first use inside a capture takes ATen's kernels and leaves the check for later."""
    monkeypatch.setattr(norm_kernels, '_CHECKED', {})
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: True)
    monkeypatch.setattr(norm_kernels, '_agrees', _raise)
    assert norm_kernels.triton_ok(torch.device('cuda', 0), 1024) is False
    assert norm_kernels._CHECKED == {}


def test_triton_kernels_match_aten_in_the_interpreter():
    pytest.importorskip('triton', reason="Triton comes with torch's Linux CUDA wheels; without it the op is ATen's")
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', _INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['ok_cpu'] is True
    for width, row in report['widths'].items():
        for name, out in row.items():
            assert out['h'] and out['bf16'] and out['fp16'] and out['dy_bf16'] and out['dy_fp16'], (width, name, out)
            assert out['fp32'] < 1e-4 and out['stats'] < 1e-5 and out['nan_row'], (width, name, out)
            assert out['constant_row'], (width, name, out)
            assert max(out['backward_bf16'], out['backward_fp16']) < 1e-4, (width, name, out)
            assert out['backward_dtype'] == 'torch.float32', (width, name, out)


@pytest.mark.parametrize('bucket', [1, 8])
def test_graphed_selective_layers_chain_the_closing_op_beside_the_feed_forward_tail(debug_lm_pkg, bucket):
    """Under `selective` without LoRA dropout the graphed stack is chained too: each layer's closing add runs with
    the next layer's norm1 as one op beside its feed-forward tail (outside its checkpoint, recompute.closing_tail),
    and the next layer's checkpoint keeps that norm1 output as how to make it again from the stream
    (recompute.normed_input). Bit for bit the eager selective step; norm1 runs once in forward (the first layer's)
    and once per layer in backward (the first layer's recompute, the others' recipes); between forward and backward
    no more memory than the stack run layer by layer. With the text padded (`bucket`) the recompute masks the added
    keys too: the same step as the graphs layer by layer."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    from test_layer_graphs import RecordingCapture
    from audiocraft_lora import layer_graphs
    from audiocraft_lora.memory_estimate import PeakTracker
    lm = _lm(0.0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # (frozen norms of their own: a wrong norm made again gives other values)
        for name, p in lm.transformer.named_parameters():
            if 'norm' in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5 if name.endswith('weight')
                        else torch.randn(p.shape, generator=generator) * 0.1)
    apply_to_model(lm, SpeedSettings(activation_checkpointing='selective'), True, torch.bfloat16)
    reference, by_layer = copy.deepcopy(lm), copy.deepcopy(lm)
    graphs = layer_graphs.install(lm, max_shapes=2, capture=RecordingCapture(), device_type='cpu',
                                  text_bucket=bucket)
    apart = layer_graphs.install(by_layer, max_shapes=2, capture=RecordingCapture(), device_type='cpu',
                                 text_bucket=bucket)
    apart._chains = lambda x: False
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(6))
    # (whether linear1's merged weight pays, as its forward decides for norm2's output, which needs a gradient: not
    # at 40 rows, where it would without one; the stack's input needs none)
    assert graphs._chains(torch.zeros(2, 32, lm.dim)) and not graphs._chains(torch.zeros(2, 20, lm.dim))
    with _Ops() as ops:
        got = _step(lm, codes)
    expected = _step(reference, codes)
    apart_step = _step(by_layer, codes)
    _equal(got, apart_step)
    if bucket == 1:
        _equal(got, expected)
    else:  # (the padded keys masked: equal up to the attention's summation order)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
    n = len(lm.transformer.layers)
    assert graphs.stats['graphed_calls'] == n
    assert ops.counts.get(OP) == 1 + n  # (forward: the first layer's alone; backward: one a layer)
    assert ops.counts.get(ADD_OP) == (2 * n + n - 1) + 2 * n  # (forward, chained; backward: norm_cross's, norm2's)
    live = []
    for model in (lm, by_layer):  # (replays: each model's first step built its delay pattern's caches)
        with PeakTracker() as tracker, torch.autocast('cpu', dtype=torch.bfloat16):
            out = model.compute_predictions(codes, [], model.condition_provider(model.condition_provider.tokenize(
                [ConditioningAttributes(text={'description': 'trap beat'}) for _ in range(2)])))
            live.append(tracker.current)
        del out
    rows = 2 * 34  # (the closing norms' float32 mean and 1/std per row are kept beside the tail: bytes a row)
    assert live[0] <= live[1] + (n - 1) * rows * 8, live


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_graphed_layers_replay_the_fused_ops_chained(debug_lm_pkg, dropout):
    """The layers' CUDA graphs capture the fused layers' forward (torch's capture stood in for on CPU, as in
    tests/test_layer_graphs.py), each layer's closing residual add run with the next layer's norm1 as one op
    (fused_norms.run_chain: the graphs hold the whole stack): the same losses and gradients as the eager fused layers,
    bit for bit, under autocast."""
    from test_layer_graphs import RecordingCapture
    from audiocraft_lora import layer_graphs
    lm = _lm(dropout)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # (frozen norms of their own: a wrong norm chained gives other values)
        for name, p in lm.transformer.named_parameters():
            if 'norm' in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5 if name.endswith('weight')
                        else torch.randn(p.shape, generator=generator) * 0.1)
    info = apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)
    assert info['fused_norms']
    reference = copy.deepcopy(lm)
    capture = RecordingCapture()
    graphs = layer_graphs.install(lm, max_shapes=2, capture=capture, device_type='cpu')
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(6))
    with _Ops() as ops:
        got = _step(lm, codes)
    expected = _step(reference, codes)
    _equal(got, expected)
    n = len(lm.transformer.layers)
    assert len(capture.calls) == 1 and graphs.stats['graphed_calls'] == n
    assert ops.counts.get(ADD_OP) == 2 * n + n - 1 and ops.counts.get(OP) == 1  # (norm1 of the first layer alone)


def test_generation_samples_the_same_tokens():
    """AudioCraft's token-by-token generation (streaming cache, CFG) through the swapped layers, under autocast: no
    gradient, so AudioCraft's norms (a step of generation is a row or two, bound by the host: no custom op there)."""
    reference = _lm(0.0).eval()
    apply_to_model(reference, SpeedSettings(fused_norms=False), True, torch.bfloat16)
    fused = copy.deepcopy(reference)
    apply_to_model(fused, SpeedSettings(), True, torch.bfloat16)
    expected = sample_tokens(reference)
    with _Ops() as ops:
        got = sample_tokens(fused)
    assert ADD_OP not in ops.counts and OP not in ops.counts and ops.counts['aten.native_layer_norm.default'] > 0
    assert type(fused.transformer.layers[0]) is fused_norms.FusedResidualLayer
    assert torch.equal(got, expected)


@pytest.mark.parametrize('norm_first, cross, layer_scale', [(True, False, None), (False, True, None),
                                                           (True, True, 0.1), (True, False, 0.1)])
def test_layers_without_cross_attention_or_post_norm(norm_first, cross, layer_scale):
    """A pre-norm layer without cross-attention fuses the add in front of norm2 only; a post-norm layer, whose norms
    write the residual stream itself (many readers, float32), is left alone; AudioCraft's LayerScale makes the
    branches float32 (their gradient a float32 copy). All give AudioCraft's values and gradients."""
    from audiocraft.modules.transformer import StreamingTransformerLayer
    torch.manual_seed(0)
    layer = StreamingTransformerLayer(16, 2, 32, dropout=0.0, cross_attention=cross, norm_first=norm_first,
                                      causal=True, custom=True, memory_efficient=True,
                                      layer_scale=layer_scale).requires_grad_(False)
    layer.linear1.weight.requires_grad_(True)  # (a trainable projection: gradients flow through the norms)
    fused = copy.deepcopy(layer)
    holder = nn.ModuleList([fused])
    assert fused_norms.install(holder) == (0 if not norm_first else 3 if cross else 2)
    x = torch.randn(2, 9, 16, requires_grad=True)
    src = torch.randn(2, 3, 16) if cross else None
    results = []
    for module in (layer, fused):
        with torch.autocast('cpu', dtype=torch.bfloat16), _Ops() as ops:
            out = module(x, cross_attention_src=src)
        grads = torch.autograd.grad(out.float().square().mean(), (x, module.linear1.weight))
        results.append((out, grads, ops.counts.get(ADD_OP, 0)))
    (out, grads, _), (fused_out, fused_grads, adds) = results
    assert torch.equal(out, fused_out) and all(torch.equal(a, b) for a, b in zip(grads, fused_grads))
    assert adds == (0 if not norm_first else 2 if cross else 1)
    with pytest.raises(AssertionError):  # AudioCraft's own check: cross-attention needs its source, and only it
        fused(x, cross_attention_src=None if cross else torch.randn(2, 3, 16))


def test_two_readers_or_hooks_keep_audiocraft_s_norms():
    """Where linear1 falls back to peft's forward (here: a second active adapter), norm2's output has two readers,
    the base projection and peft's LoRA branch (which casts it to float32): that layer runs AudioCraft's norms. A
    forward hook of one's own on norm2 runs: that norm is then called as a module. Both give AudioCraft's values."""
    import peft
    reference = _lm(0.0)
    apply_to_model(reference, SpeedSettings(fused_norms=False), True, torch.bfloat16)
    fused = copy.deepcopy(reference)
    apply_to_model(fused, SpeedSettings(), True, torch.bfloat16)
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(7))
    layers = len(fused.transformer.layers)
    for lm in (reference, fused):
        linear1 = lm.transformer.layers[0].linear1
        torch.manual_seed(8)
        linear1.update_layer('second', 2, 4, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
        linear1.set_adapter([*linear1.active_adapters, 'second'])
    expected = _step(reference, codes)
    with _Ops() as ops:
        got = _step(fused, codes)
    _equal(got, expected)
    assert ops.counts[OP] == layers - 1 and ops.counts[ADD_OP] == 2 * (layers - 1)  # not the first layer
    for register in ('register_forward_hook', 'register_forward_pre_hook'):
        seen = []
        handle = getattr(fused.transformer.layers[1].norm2, register)(lambda module, args, *out: seen.append(1))
        with _Ops() as ops:
            got = _step(fused, codes)
        _equal(got, expected)
        assert seen == [1]  # (the layer's norm2 still fused: the norm alone, its add apart)
        assert ops.counts[ADD_OP] == 2 * (layers - 1) - 1 and ops.counts[OP] == layers
        handle.remove()
