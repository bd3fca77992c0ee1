"""`selective` activation checkpointing runs each layer's feed-forward tail, `linear2(activation(h))`, outside the
layer's checkpoint (recompute.ff_block): nothing of it kept but what backward reads, no large GEMM run twice, and the
same step bit for bit. CPU, float32, the debug base (2 layers, GELU), 2 x 48 frames (training-sized for its width:
the fast path merges the weight)."""
import contextlib
import copy
import weakref

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from audiocraft_lora import base_models, recompute
from audiocraft_lora.lora import LoRASettings, inject_lora, lora_parameters
from audiocraft_lora.speed import SpeedSettings, apply_to_model

PROMPTS = ['trap beat with 808 bass', 'ambient pad']
RANK = 4


@pytest.fixture
def codes():
    return torch.randint(0, 256, (2, 4, 48), generator=torch.Generator().manual_seed(0))


def _lm(pkg, plan: str, dropout: float = 0.0):
    lm = base_models.build_lm(pkg)
    inject_lora(lm, LoRASettings(rank=RANK, alpha=8, init='random', dropout=dropout), fast_path=True)
    apply_to_model(lm, SpeedSettings(activation_checkpointing=plan), False, torch.bfloat16)
    lm.train()
    return lm


def _loss(lm, codes):
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver
    attributes = [ConditioningAttributes(text={'description': d}) for d in PROMPTS]
    condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
    out = lm.compute_predictions(codes, [], condition_tensors)
    ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
    return ce


class _Made(TorchDispatchMode):
    """The storages of what the ops run in this mode make (weak references), with their shapes."""

    def __init__(self):
        super().__init__()
        self.refs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.refs.append((weakref.ref(t.untyped_storage()), tuple(t.shape)))
        return out


def _watched_step(lm, codes, captured: bool = False):
    """(loss, adapter gradients, the shapes of linear2's input and of what linear2's ops made whose memory is still
    alive between forward and backward: storages, which a view, a detached alias or a cache keeps alive; of its ops'
    results those of its input's or output's size (the dropped-out input and its mask, the products), not the rank-r
    products, weights and adapter casts backward reads)."""
    refs: list = []
    handles = []

    def enter(module, args):
        refs.append((weakref.ref(args[0].untyped_storage()), tuple(args[0].shape)))
        module._watch = _Made()
        module._watch.__enter__()

    def leave(module, args, out):
        module._watch.__exit__(None, None, None)
        rows, widths = out.numel() // out.shape[-1], (args[0].shape[-1], out.shape[-1])
        refs.extend((ref, shape) for ref, shape in module._watch.refs
                    if shape and shape[-1] in widths and torch.Size(shape).numel() // shape[-1] == rows)
    for layer in lm.transformer.layers:
        handles += [layer.linear2.register_forward_pre_hook(enter), layer.linear2.register_forward_hook(leave)]
    torch.manual_seed(3)
    with recompute.captured_plan(lm) if captured else contextlib.nullcontext():
        loss = _loss(lm, codes)
    for handle in handles:
        handle.remove()
    alive = list({id(ref()): shape for ref, shape in refs if ref() is not None}.values())  # (each storage once)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in lora_parameters(lm).items()}, alive


@pytest.mark.parametrize('captured', [False, True])
def test_selective_keeps_neither_the_ff_activation_nor_linear2s_output(debug_lm_pkg, codes, captured):
    """Between forward and backward neither the GELU's output (made again from its input when backward needs it)
    nor linear2's output (never read in backward) is alive under `selective`, eagerly or as inside the CUDA graphs
    (`captured`); the step is the plain one's bit for bit."""
    lm = _lm(debug_lm_pkg, 'selective')
    assert all(layer._ff_block.func is recompute.ff_block for layer in lm.transformer.layers)
    loss, grads, alive = _watched_step(lm, codes, captured)
    assert alive == []
    ref_loss, ref_grads, ref_alive = _watched_step(_lm(debug_lm_pkg, 'none'), codes)
    assert ref_alive  # (the plain step keeps linear2's input, the GELU's output: the watch sees it)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for key, grad in ref_grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(grads[key], grad, atol=0, rtol=0, msg=key)


class _LargeProducts(TorchDispatchMode):
    """Matmuls contracting over more than the LoRA rank that run (selective's cached ones return without running)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind, left = recompute._op_kind(func)
        if kind == 'matmul' and args[left].shape[-1] > RANK:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_selective_backward_runs_no_large_gemm_twice(debug_lm_pkg, codes):
    """Every large product of a `selective` step runs once, as in the plain step: the recompute reruns norms, GELU
    and rank-r updates only, and stops before linear2 (whose packs are outside the checkpoint)."""
    counts = {}
    for plan in ('none', 'selective', 'torch'):
        lm = _lm(debug_lm_pkg, plan)
        with _LargeProducts() as products:
            _loss(lm, codes).backward()
        counts[plan] = products.count
    assert counts['selective'] == counts['none'] < counts['torch']


def test_the_block_runs_as_audiocraft_s_where_the_tail_would_keep_more(debug_lm_pkg, codes):
    """With LoRA dropout (linear1's output is then a rank-r update added to the product the region keeps, linear2's
    dropped-out input and mask would be kept where the region draws them again), AudioCraft's own feed-forward
    dropout, peft's own forward, a batch too small for the merged weight, or in eval, the tail would keep more than
    the layer's recompute makes again: the block stays inside the checkpoint, and the step is still the plain one's."""
    x = torch.zeros(2, 49, 32, requires_grad=True)  # (the debug base's width)
    layer = _lm(debug_lm_pkg, 'selective', dropout=0.1).transformer.layers[0]
    assert not recompute._tail_fits(layer, x)
    for linear in (layer.linear1, layer.linear2):
        linear.lora_dropout['default'].p = 0.0
    for linear in (layer.linear1, layer.linear2):
        linear.lora_dropout['default'].p = 0.1
        assert not recompute._tail_fits(layer, x)
        linear.lora_dropout['default'].p = 0.0
        linear.merged_adapters.append('default')  # (merged: peft's own forward, which saves a reshape of its input)
        assert not recompute._tail_fits(layer, x)
        linear.merged_adapters.clear()
    for name in ('dropout', 'dropout2'):
        getattr(layer, name).p = 0.1
        assert not recompute._tail_fits(layer, x)
        getattr(layer, name).p = 0.0
    for attribute, value in (('activation', F.relu), ('layer_scale_2', torch.nn.Linear(1, 1)), ('norm_first', False)):
        before = getattr(layer, attribute)
        setattr(layer, attribute, value)  # (ReLU saves its output; LayerScale and a post-norm norm2 save the tail's)
        assert not recompute._tail_fits(layer, x)
        setattr(layer, attribute, before)
    # (the merged weight pays from 52 rows with dx, as LowRankLinear decides; from 32 without)
    rows = x[:, :20].detach()
    assert recompute._tail_fits(layer, rows) and not recompute._tail_fits(layer, rows.requires_grad_())
    assert recompute._tail_fits(layer, x)
    layer.eval()
    assert not recompute._tail_fits(layer, x)
    lm = _lm(debug_lm_pkg, 'selective', dropout=0.1)
    assert not recompute._tail_fits(lm.transformer.layers[0], x)
    loss, grads, alive = _watched_step(lm, codes)
    ref_loss, ref_grads, _ = _watched_step(_lm(debug_lm_pkg, 'none', dropout=0.1), codes)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for key, grad in ref_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=0, rtol=0, msg=key)


def test_plans_other_than_selective_leave_the_block_alone(debug_lm_pkg):
    lm = _lm(debug_lm_pkg, 'selective')
    clone = copy.deepcopy(lm)
    assert all(layer._ff_block.args[0] is layer for layer in clone.transformer.layers)  # (the copy's own layers)
    recompute.set_checkpointing(lm, 'torch')
    assert all('_ff_block' not in vars(layer) for layer in lm.transformer.layers)
    recompute.set_checkpointing(lm, 'torch', 0.5, rest='selective')
    assert ['_ff_block' in vars(layer) for layer in lm.transformer.layers] == [False, True]


def test_only_a_selective_region_runs_the_tail_and_leaves_no_state_behind(debug_lm_pkg, codes, monkeypatch):
    """Whole-layer checkpointing of a selective layer (the CUDA graphs' warmup, their eager fallback) and a plain call
    run the block as AudioCraft's; a selective step, or one that raises inside the layer, leaves the regions' state
    as it found it."""
    lm = _lm(debug_lm_pkg, 'selective')
    layer = lm.transformer.layers[0]
    x = torch.randn(2, 49, 32, requires_grad=True)
    calls = []
    outside = recompute._outside
    monkeypatch.setattr(recompute, '_outside', lambda *args: calls.append(1) or outside(*args))
    text = torch.randn(2, 3, 32)
    torch.utils.checkpoint.checkpoint(layer, x, cross_attention_src=text, use_reentrant=False).sum().backward()
    layer(x, cross_attention_src=text).sum().backward()
    assert calls == []
    _loss(lm, codes).backward()
    assert len(calls) == len(lm.transformer.layers)
    assert recompute._STATE.region is None and not recompute._STATE.tail

    def broken(*args):
        raise RuntimeError('in the tail')
    monkeypatch.setattr(recompute, '_outside', broken)
    with pytest.raises(RuntimeError, match='in the tail'):
        _loss(lm, codes)
    assert recompute._STATE.region is None and not recompute._STATE.tail
