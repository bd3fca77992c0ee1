"""Fast LoRA path (`fast_lora`, `speed`): same logits, loss and gradients as peft's plain path, adapter-only grads,
canonical names, merge, activation checkpointing, low-precision frozen base. CPU, float32 unless stated."""
import copy

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from audiocraft_lora import base_models, fast_lora
from audiocraft_lora.errors import LoRAConfigError
from audiocraft_lora.fast_lora import CONCAT_PARTS, FastLoraLinear, low_rank_linear
from audiocraft_lora.fused_in_proj import LoRAStreamingMultiheadAttention, LowRankWeight
from audiocraft_lora.lora import (
    AdapterParameters, LoRASettings, delta_weights, inject_lora, lora_parameters, merge_into_state_dict)
from audiocraft_lora.speed import SpeedSettings, apply_to_model, optimizer_kwargs, pin_loaders
from helpers import conditioned_logits

PROMPTS = ['trap beat with 808 bass', 'ambient pad']


@pytest.fixture
def codes():
    return torch.randint(0, 256, (2, 4, 24), generator=torch.Generator().manual_seed(0))


def _lm(pkg, fast_path: bool, settings: LoRASettings):
    lm = base_models.build_lm(pkg)
    inject_lora(lm, settings, fast_path=fast_path)
    return lm


def _loss(lm, codes, autocast_dtype=None):
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver
    attributes = [ConditioningAttributes(text={'description': d}) for d in PROMPTS]
    with torch.autocast('cpu', dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        out = lm.compute_predictions(codes, [], condition_tensors)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
    return ce


def _grads(lm):
    return {k: p.grad.clone() for k, p in lora_parameters(lm).items()}


def _train_step(lm, codes):
    """(loss, adapter gradients) of one training forward and backward."""
    lm.train()
    loss = _loss(lm, codes)
    loss.backward()
    return loss.detach(), _grads(lm)


def _assert_same_step(step0, step1):
    """The same loss bit for bit, and the same adapter gradients up to float32 summation order."""
    (loss0, grads0), (loss1, grads1) = step0, step1
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], atol=1e-6, rtol=1e-5, msg=key)


def test_low_rank_linear_matches_the_merged_weight_in_double():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w, bias = torch.randn(12, 8, dtype=torch.float64, generator=gen), torch.randn(12, dtype=torch.float64)
    a = torch.randn(2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(12, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda x, a, b: low_rank_linear(x, w, bias, a, b, 0.7), (x, a, b))
    torch.testing.assert_close(low_rank_linear(x, w, bias, a, b, 0.7), F.linear(x, w + 0.7 * b @ a, bias))


def test_without_dropout_the_merged_product_equals_the_rank_r_update_and_keeps_no_merged_weight():
    """dropout 0 takes one GEMM with W + s B A (rebuilt in backward); dropout > 0 adds s (x A^T) B^T: same function."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 6, 16, dtype=torch.float64, generator=gen, requires_grad=True)  # 48 rows: merged
    w = torch.randn(24, 16, dtype=torch.float64, generator=gen)
    a = torch.randn(3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(24, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(8, 6, 24, dtype=torch.float64, generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        merged = low_rank_linear(x, w, None, a, b, 0.7, 0.0)
    assert not any(t.shape == w.shape and t is not w for t in saved)  # W + s B A is not kept for backward
    got = torch.autograd.grad(merged, (x, a, b), grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    update = F.linear(x2, w) + 0.7 * F.linear(F.linear(x2, a2), b2)
    expected = torch.autograd.grad(update, (x2, a2, b2), grad)
    torch.testing.assert_close(merged, update, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(got, expected):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # bf16: the same within bf16 rounding
        low = low_rank_linear(x.float(), w.float(), None, a.float(), b.float(), 0.7, 0.0)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), update.detach(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize('rows, merged', [(2 * 6, False), (3 * 6, True), (40 * 6, True)])
def test_the_weight_is_merged_only_for_training_sized_batches(rows, merged):
    """A generation step (a few rows) adds the rank-r update; a training batch builds W + s B A where that moves
    fewer bytes (here, [20, 16] built twice vs the [N, 20] output and [N, 16] dx: from 18 rows on): both give the
    update's values and gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.addmm.default:
                self.outputs.append(tuple(out.shape))
            return out
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(rows // 6, 6, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(20, 16, dtype=torch.float64, generator=gen)
    a = torch.randn(3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(20, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    with Shapes() as shapes:
        y = low_rank_linear(x, w, None, a, b, 0.7, 0.0)
        got = torch.autograd.grad(y, (x, a, b), torch.ones_like(y))
    assert ((20, 16) in shapes.outputs) is merged, shapes.outputs  # addmm building the [out, in] merged weight
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    update = F.linear(x2, w) + 0.7 * F.linear(F.linear(x2, a2), b2)
    torch.testing.assert_close(y, update, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(got, torch.autograd.grad(update, (x2, a2, b2), torch.ones_like(update))):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


class _OpNames(TorchDispatchMode):
    """The names of the kernel-running ATen ops run under it (views and metadata left out)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in ('view', '_unsafe_view', 't', 'slice', 'reshape', 'expand', 'as_strided', 'empty',
                        'new_empty', 'empty_strided', 'detach', 'alias', 'transpose', 'split', 'select'):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('parts', [(), ('forward',), ('dropout_forward',), ('backward',), CONCAT_PARTS],
                         ids=lambda p: '+'.join(p) or 'split')
@pytest.mark.parametrize('dropout, bias', [(0.0, False), (0.0, True), (0.1, False)])
def test_rank_r_products_from_the_base_gemms_read_less_and_give_the_same_values(dropout, bias, parts, monkeypatch):
    """Rank-r products are memory-bound passes over x [N, in] or the gradient g [N, out]. Each part of
    fast_lora.CONCAT_RANK_GEMMS takes one from the base GEMM reading the same operand ('forward', merged: y and
    x A^T; 'dropout_forward': y from [x | u] [W | s B]^T; 'backward': dx and g B): one matrix product fewer reads x
    or g, and values and gradients stay those of the update formula (float64)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setattr(fast_lora, 'CONCAT_RANK_GEMMS', frozenset(parts))

    class Reads(TorchDispatchMode):
        def __init__(self, watched):
            super().__init__()
            self.watched, self.count = watched, {k: 0 for k in watched}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                ptrs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
                for name, ptr in self.watched.items():
                    self.count[name] += ptr in ptrs
            return func(*args, **(kwargs or {}))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, 16, dtype=torch.float64, generator=gen, requires_grad=True)  # 60 rows: merged
    w = torch.randn(24, 16, dtype=torch.float64, generator=gen)
    bias_t = torch.randn(24, dtype=torch.float64, generator=gen) if bias else None
    a = torch.randn(3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(24, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(10, 6, 24, dtype=torch.float64, generator=gen)
    torch.manual_seed(0)
    with Reads({'x': x.untyped_storage().data_ptr()}) as forward:
        y = low_rank_linear(x, w, bias_t, a, b, 0.7, dropout)
    with Reads({'x': x.untyped_storage().data_ptr(), 'g': grad.untyped_storage().data_ptr()}) as backward:
        got = torch.autograd.grad(y, (x, a, b), grad)
    if dropout:  # x A^T reads dropout(x); 'dropout_forward' writes x beside it: [x | u] [W | s B]^T is one GEMM
        assert forward.count == {'x': 0 if 'dropout_forward' in parts else 1}
    else:  # merged: x (W + s B A)^T and x A^T
        assert forward.count == {'x': 1 if 'forward' in parts else 2}
        if parts == ('forward',) and not bias:  # built in place: no cat, as many kernels as the split forward
            monkeypatch.setattr(fast_lora, 'CONCAT_RANK_GEMMS', frozenset())
            with _OpNames() as split:
                low_rank_linear(x, w, bias_t, a, b, 0.7, dropout)
            monkeypatch.setattr(fast_lora, 'CONCAT_RANK_GEMMS', frozenset(parts))
            with _OpNames() as concat:
                low_rank_linear(x, w, bias_t, a, b, 0.7, dropout)
            assert 'cat' not in concat.names and len(concat.names) == len(split.names), (concat.names, split.names)
    # dx, g B, dB read g; dA reads x (dropout(x), kept, with dropout)
    assert backward.count == {'x': 0 if dropout else 1, 'g': 2 if 'backward' in parts else 3}
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    torch.manual_seed(0)  # the same mask
    xd = torch.native_dropout(x2, dropout, True)[0] if dropout else x2
    update = F.linear(x2, w, bias_t) + 0.7 * F.linear(F.linear(xd, a2), b2)
    torch.testing.assert_close(y, update, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(got, torch.autograd.grad(update, (x2, a2, b2), grad)):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_backward_under_autocast_casts_only_the_gradients_it_returns():
    """Launches count at small batch (the step is CPU-bound there): backward reuses the adapter as forward cast it
    and recasts nothing but the float32 gradients of x, A and B."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    w = torch.randn(24, 16, generator=gen).bfloat16()
    a = torch.randn(4, 16, generator=gen, requires_grad=True)
    b = torch.randn(24, 4, generator=gen, requires_grad=True)
    for dropout in (0.0, 0.1):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = low_rank_linear(x, w, None, a, b, 0.5, dropout)
        with Casts() as casts:
            torch.autograd.grad(y, (x, a, b), torch.ones_like(y))
        assert casts.count == 3, (dropout, casts.count)


def test_low_rank_weight_slices_rows_like_the_merged_weight():
    gen = torch.Generator().manual_seed(1)
    w, a, b = torch.randn(12, 4, generator=gen), torch.randn(2, 4, generator=gen), torch.randn(12, 2, generator=gen)
    view, merged = LowRankWeight(w, a, b, 0.5), w + 0.5 * b @ a
    x = torch.randn(3, 4, generator=gen)
    assert view.shape == (12, 4) and view.shape[0] // 3 == 4
    for rows in (slice(None, 4), slice(4, 8), slice(8, None)):
        part = view[rows]
        assert isinstance(part, LowRankWeight)
        torch.testing.assert_close(F.linear(x, part), F.linear(x, merged[rows]))
    torch.testing.assert_close(torch.matmul(x, view.materialize().t()), x @ merged.t())  # other ops: materialised
    torch.testing.assert_close(view[1], merged[1])


def test_zero_init_fast_path_gives_the_base_logits_exactly(debug_lm_pkg, codes):
    expected = conditioned_logits(base_models.build_lm(debug_lm_pkg), codes, PROMPTS)
    lm = _lm(debug_lm_pkg, True, LoRASettings(rank=4, alpha=8))
    assert isinstance(lm.transformer.layers[0].self_attn, LoRAStreamingMultiheadAttention)
    assert isinstance(lm.transformer.layers[0].cross_attention, LoRAStreamingMultiheadAttention)
    assert isinstance(lm.transformer.layers[0].linear1, FastLoraLinear)
    assert torch.equal(conditioned_logits(lm, codes, PROMPTS), expected)


def test_fast_path_names_and_order_are_those_of_the_plain_path(debug_lm_pkg):
    settings = LoRASettings(rank=4, alpha=8, init='random')
    plain, fast = _lm(debug_lm_pkg, False, settings), _lm(debug_lm_pkg, True, settings)
    plain_params, fast_params = lora_parameters(plain), lora_parameters(fast)
    assert list(plain_params) == list(fast_params)  # same canonical names, same order (optimizer state indices)
    for key, value in plain_params.items():
        assert torch.equal(value, fast_params[key]) and value.dtype == torch.float32
    assert 'transformer.layers.0.self_attn.in_proj.lora_B.weight' in fast_params
    # the base keeps its un-injected name for the fused weight
    assert 'transformer.layers.0.self_attn.in_proj_weight' in fast.state_dict()


@pytest.mark.parametrize('concat', [(), CONCAT_PARTS], ids=['split', 'concat'])
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_fast_path_logits_loss_and_grads_equal_the_plain_path(debug_lm_pkg, codes, dropout, concat, monkeypatch):
    monkeypatch.setattr(fast_lora, 'CONCAT_RANK_GEMMS', frozenset(concat))
    settings = LoRASettings(rank=4, alpha=8, init='random', dropout=dropout)
    plain, fast = _lm(debug_lm_pkg, False, settings), _lm(debug_lm_pkg, True, settings)
    torch.testing.assert_close(conditioned_logits(fast, codes, PROMPTS), conditioned_logits(plain, codes, PROMPTS),
                               atol=1e-5, rtol=1e-5)
    losses, grads = [], []
    for lm in (plain, fast):
        lm.train()
        torch.manual_seed(7)  # same dropout masks
        loss = _loss(lm, codes)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(lm))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4, msg=key)


def test_fused_in_proj_weight_is_the_base_parameter_outside_forward(debug_lm_pkg, codes):
    """Outside the attention's forward `in_proj_weight` is the registered Parameter: `get_parameter` works for every
    name `named_parameters` gives; inside forward it carries the adapter (the logits change with B != 0)."""
    lm = _lm(debug_lm_pkg, True, LoRASettings(rank=4, alpha=8, init='random'))
    for name, param in lm.named_parameters():
        assert lm.get_parameter(name) is param, name
    attention = lm.transformer.layers[0].self_attn
    assert isinstance(attention, LoRAStreamingMultiheadAttention)
    assert attention.in_proj_weight is attention._parameters['in_proj_weight']
    before = conditioned_logits(lm, codes, PROMPTS)
    with torch.no_grad():
        attention.in_proj.lora_B.weight.add_(0.5)
    assert not torch.allclose(conditioned_logits(lm, codes, PROMPTS), before)
    assert attention.in_proj_weight is attention._parameters['in_proj_weight']  # (forward left it so)


def test_only_adapter_parameters_get_gradients(debug_lm_pkg, codes):
    lm = _lm(debug_lm_pkg, True, LoRASettings(rank=4, alpha=8))
    lm.train()
    _loss(lm, codes).backward()
    adapter = set(lora_parameters(lm).values())
    for name, param in lm.named_parameters():
        if any(param is p for p in adapter):
            assert param.grad is not None, name
        else:
            assert param.grad is None and not param.requires_grad, name
    # zero-init B: A gets no signal yet, B does (in every adapted projection, self- and cross-attention included)
    for key, param in lora_parameters(lm).items():
        if '.lora_B.' in key:
            assert param.grad.abs().sum() > 0, key


def test_merge_and_delta_of_a_fast_path_adapter_equal_its_forward(debug_lm_pkg, codes):
    settings = LoRASettings(rank=4, alpha=8, init='random')
    lm = _lm(debug_lm_pkg, True, settings)
    adapted = conditioned_logits(lm, codes, PROMPTS)
    adapter = {k: v.detach().clone() for k, v in AdapterParameters(lm).state_dict().items()}
    base_state = debug_lm_pkg['best_state']
    deltas = delta_weights(adapter, settings.scaling)
    assert 'transformer.layers.0.self_attn.in_proj_weight' in deltas
    merged = base_models.build_lm(debug_lm_pkg)
    merged.load_state_dict(merge_into_state_dict(base_state, adapter, settings.scaling))
    torch.testing.assert_close(conditioned_logits(merged, codes, PROMPTS), adapted, atol=1e-5, rtol=0)
    # an adapter moves between the paths through canonical names
    plain = _lm(debug_lm_pkg, False, LoRASettings(rank=4, alpha=8))
    AdapterParameters(plain).load_state_dict(adapter)
    torch.testing.assert_close(conditioned_logits(plain, codes, PROMPTS), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mode, fast_path, fraction, rest', [
    ('torch', True, 1.0, 'none'), ('torch', False, 1.0, 'none'), ('torch', True, 0.5, 'none'),
    ('selective', True, 1.0, 'none'), ('selective', False, 1.0, 'none'), ('selective', True, 0.5, 'none'),
    ('torch', True, 0.5, 'selective')])
def test_activation_checkpointing_gives_the_same_gradients(debug_lm_pkg, codes, mode, fast_path, fraction, rest):
    settings = LoRASettings(rank=4, alpha=8, init='random', dropout=0.1)
    results = []
    for checkpointing in ('none', mode):
        lm = _lm(debug_lm_pkg, fast_path, settings)
        info = apply_to_model(lm, SpeedSettings(
            fast_path=fast_path, activation_checkpointing=checkpointing, checkpoint_fraction=fraction,
            checkpoint_rest=rest if checkpointing != 'none' else 'none'), False, torch.bfloat16)
        assert lm.transformer.checkpointing == ('torch' if checkpointing == 'torch' else 'none')
        if checkpointing != 'none' and (fraction < 1 or checkpointing == 'selective'):
            assert info['checkpointed_layers'] == ([0] if fraction < 1 else [0, 1])  # of the debug base's 2 layers
        torch.manual_seed(3)
        results.append(_train_step(lm, codes))
    (_, grads0), (_, grads1) = results
    for key in grads0:
        assert grads1[key].abs().sum() > 0 or grads0[key].abs().sum() == 0, key
    _assert_same_step(*results)


def test_selective_checkpointing_recomputes_only_cheap_work(debug_lm_pkg, codes):
    """Whole-layer checkpointing runs every matmul twice in backward; selective keeps the large matmul and attention
    outputs, so its extra FLOPs are only the rank-r LoRA updates it recomputes (rank 1 here: ~1/32 of a base matmul
    of the debug base)."""
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for mode in ('none', 'selective', 'torch'):
        lm = _lm(debug_lm_pkg, True, LoRASettings(rank=1, alpha=2, init='random'))
        apply_to_model(lm, SpeedSettings(activation_checkpointing=mode), False, torch.bfloat16)
        lm.train()
        with FlopCounterMode(display=False) as counter:
            _loss(lm, codes).backward()
        flops[mode] = counter.get_total_flops()
    assert flops['torch'] > 1.2 * flops['none']
    assert flops['none'] < flops['selective'] < flops['none'] + 0.1 * (flops['torch'] - flops['none'])


def test_bf16_base_keeps_adapter_fp32_and_changes_no_autocast_result(debug_lm_pkg, codes):
    settings = LoRASettings(rank=4, alpha=8, init='random')
    ref, low = _lm(debug_lm_pkg, True, settings), _lm(debug_lm_pkg, True, settings)
    info = apply_to_model(low, SpeedSettings(base_dtype='bfloat16'), True, torch.bfloat16)
    assert info['base_dtype'] == 'bfloat16' and info['base_tensors_cast'] > 0
    assert low.transformer.layers[0].self_attn._parameters['in_proj_weight'].dtype == torch.bfloat16
    assert low.transformer.layers[0].linear1.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(low).values())
    assert low.emb[0].weight.dtype == torch.float32  # embeddings, norms, heads: untouched
    losses = []
    for lm in (ref, low):
        lm.train()
        torch.manual_seed(5)  # same LoRA dropout masks
        losses.append(_loss(lm, codes, torch.bfloat16))
    loss_ref, loss_low = losses
    torch.testing.assert_close(loss_low, loss_ref, atol=0, rtol=0)  # autocast casts to bf16 anyway: same bits
    loss_ref.backward()
    loss_low.backward()
    for key, grad in _grads(ref).items():
        assert lora_parameters(low)[key].grad.dtype == torch.float32
        torch.testing.assert_close(lora_parameters(low)[key].grad, grad, atol=0, rtol=0, msg=key)


def test_fast_path_under_autocast_is_close_to_the_plain_path(debug_lm_pkg, codes):
    settings = LoRASettings(rank=4, alpha=8, init='random', dropout=0.0)
    plain, fast = _lm(debug_lm_pkg, False, settings), _lm(debug_lm_pkg, True, settings)
    losses = [_loss(lm.train(), codes, torch.bfloat16) for lm in (plain, fast)]
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('kwargs, autocast, match', [
    ({'base_dtype': 'bfloat16'}, False, 'needs autocast=true'),
    ({'base_dtype': 'float16'}, True, 'autocast_dtype=float16'),
    ({'base_dtype': 'bfloat16', 'fast_path': False}, True, 'needs lora.fast_path=true'),
    ({'base_dtype': 'int8'}, True, 'lora.base_dtype must be'),
    ({'activation_checkpointing': 'xformers_default'}, True, 'lora.activation_checkpointing must be'),
    ({'checkpoint_fraction': 0}, True, 'lora.checkpoint_fraction must be'),
    ({'checkpoint_rest': 'torch'}, True, 'lora.checkpoint_rest must be'),
    ({'pin_memory': 'yes'}, True, 'lora.pin_memory must be'),
    ({'keep_merged_weights': 'when_it_fits'}, True, 'lora.keep_merged_weights must be auto, true or false'),
    ({'checkpoint_rest': 'selective', 'activation_checkpointing': 'none'}, True,
     'set lora.activation_checkpointing=torch'),
    ({'checkpoint_rest': 'selective'}, True, 'auto chooses checkpoint_fraction and checkpoint_rest'),
])
def test_bad_speed_settings_are_refused(kwargs, autocast, match):
    with pytest.raises(LoRAConfigError, match=match):
        settings = SpeedSettings.from_config(kwargs)
        settings.resolve_base_dtype(autocast, torch.bfloat16)


def test_pin_memory_auto_pins_only_for_cuda():
    from torch.utils.data import DataLoader
    loaders = {'train': DataLoader(list(range(4))), 'valid': DataLoader(list(range(4)))}
    assert pin_loaders(loaders, SpeedSettings(), 'cpu') == []
    assert pin_loaders(loaders, SpeedSettings(pin_memory=False), 'cuda') == []
    assert not any(loader.pin_memory for loader in loaders.values())
    assert pin_loaders(loaders, SpeedSettings(), 'cuda:0') == ['train', 'valid']
    assert all(loader.pin_memory for loader in loaders.values())


def test_auto_settings_and_optimizer_kwargs():
    auto = SpeedSettings()
    assert auto.resolve_base_dtype(True, torch.bfloat16) is torch.bfloat16
    assert auto.resolve_base_dtype(False, torch.bfloat16) is torch.float32
    assert SpeedSettings(fast_path=False).resolve_base_dtype(True, torch.bfloat16) is torch.float32
    cpu_params = [torch.zeros(2, requires_grad=True)]
    assert optimizer_kwargs(auto, cpu_params, 'adamw') == {'foreach': True}
    assert optimizer_kwargs(SpeedSettings(fused_optimizer=True), cpu_params, 'adamw') == {'fused': True}
    assert optimizer_kwargs(SpeedSettings(fused_optimizer=False), cpu_params, 'adamw') == {}
    assert optimizer_kwargs(auto, cpu_params, 'dadam') == {}


def test_solver_wires_the_speed_settings(dora_dir):
    from helpers import DEBUG_ARGS, build_solver
    solver, _ = build_solver(DEBUG_ARGS + ['lora.activation_checkpointing=torch', 'lora.fused_optimizer=true'])
    assert solver.model.transformer.checkpointing == 'torch'
    assert isinstance(solver.model.transformer.layers[0].self_attn, LoRAStreamingMultiheadAttention)
    assert solver.optimizer.defaults.get('fused') is True
    assert not any(loader.pin_memory for loader in solver.dataloaders.values())  # auto: only on CUDA
    selective, _ = build_solver(DEBUG_ARGS + ['lora.activation_checkpointing=selective', 'lora.pin_memory=true'])
    assert selective.model.transformer._apply_layer.func.__name__ == '_apply_layer_planned'
    clone = copy.deepcopy(selective.model)  # the plan lives on the layers, so a copy keeps it
    assert [layer._lora_checkpointing for layer in clone.transformer.layers] == ['selective', 'selective']
    assert all(loader.pin_memory for loader in selective.dataloaders.values())
    assert list(AdapterParameters(solver.model).state_dict()) == list(solver.adapter.state_dict())
    with pytest.raises(LoRAConfigError, match='needs autocast=true'):
        build_solver(DEBUG_ARGS + ['lora.base_dtype=bfloat16'])


def test_deepcopy_of_a_fast_path_model_is_independent(debug_lm_pkg, codes):
    lm = _lm(debug_lm_pkg, True, LoRASettings(rank=4, alpha=8, init='random'))
    clone = copy.deepcopy(lm)
    with torch.no_grad():
        for param in lora_parameters(clone).values():
            param.zero_()
    base = conditioned_logits(base_models.build_lm(debug_lm_pkg), codes, PROMPTS)
    assert torch.equal(conditioned_logits(clone, codes, PROMPTS), base)
    assert not torch.equal(conditioned_logits(lm, codes, PROMPTS), base)


def test_dropout_mask_is_replayed_in_backward_not_saved():
    """With `replay` (lora.dropout_replay) the fast path keeps no dropout mask: backward draws the forward's mask
    again from the generator state, leaves the generator as the forward left it, and gives the gradients of the mask
    the forward used. Without it (the default) the mask is kept."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    weight = torch.randn(12, 16, generator=gen)
    a = torch.randn(4, 16, generator=gen, requires_grad=True)
    b = torch.randn(12, 4, generator=gen, requires_grad=True)
    grad = torch.randn(8, 12, generator=gen)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        low_rank_linear(x, weight, None, a, b, 2.0, 0.5)  # default: the mask is kept
    assert any(t.dtype == torch.bool for t in kept)
    torch.manual_seed(0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = low_rank_linear(x, weight, None, a, b, 2.0, 0.5, replay=True)
    assert not any(t.dtype == torch.bool for t in saved)  # no mask kept for backward
    after_forward = torch.get_rng_state()
    y.backward(grad)
    assert torch.equal(torch.get_rng_state(), after_forward)
    # reference: the same mask (drawn from the same state) through plain autograd
    torch.set_rng_state(before)
    _, mask = torch.native_dropout(x.detach(), 0.5, True)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y2 = F.linear(x2, weight) + 2.0 * F.linear(F.linear(x2 * mask * 2.0, a2), b2)
    y2.backward(grad)
    assert mask.float().mean().item() not in (0.0, 1.0)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for mine, ref in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_dropout_on_fake_tensors_never_touches_the_generator(monkeypatch):
    """memory_plan's estimate runs the fast path on fake tensors: there the mask is drawn (shapes only) without
    reading or setting a generator (the estimate must leave the real run's random numbers alone)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def refuse(*args, **kwargs):
        raise AssertionError('generator touched')
    x = torch.randn(8, 16, requires_grad=True)
    weight, a, b = torch.randn(12, 16), torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    for name in ('get_rng_state', 'set_rng_state'):
        monkeypatch.setattr(torch, name, refuse)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = low_rank_linear(x, weight, None, a, b, 2.0, 0.5, replay=True)
        grads = torch.autograd.grad(y.sum(), (x, a, b))
    assert [g.shape for g in grads] == [x.shape, a.shape, b.shape]


def _step_ops(lm, codes, autocast_dtype=None):
    """Loss, adapter gradients and the kernel-running ATen ops of one forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    lm.train()
    for p in lm.parameters():
        p.grad = None
    torch.manual_seed(7)  # the same dropout masks
    with Count():
        loss = _loss(lm, codes, autocast_dtype)
        loss.backward()
    return loss.detach(), _grads(lm), ops


@pytest.mark.parametrize('autocast_dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_cross_attention_key_and_value_from_one_product_change_nothing(debug_lm_pkg, codes, autocast_dtype,
                                                                       monkeypatch):
    from audiocraft_lora import fused_in_proj
    settings = LoRASettings(rank=4, alpha=8, init='random')
    lm = _lm(debug_lm_pkg, True, settings)
    layers = len(lm.transformer.layers)
    results = {}
    for combine in (False, True):
        monkeypatch.setattr(fused_in_proj, 'COMBINE_CROSS_KV', combine)
        results[combine] = _step_ops(lm, codes, autocast_dtype)
    (loss0, grads0, ops0), (loss1, grads1, ops1) = results[False], results[True]
    assert torch.equal(loss1, loss0)  # the same products, element for element
    for key in grads0:  # A's gradient sums the key's and the value's parts in one GEMM: rounding apart (~1e-8)
        exact = 'cross_attention.in_proj.lora_A' not in key
        torch.testing.assert_close(grads1[key], grads0[key], atol=0 if exact else 1e-8,
                                   rtol=0 if exact else 1e-6, msg=key)
    # per layer: one rank-r product, one base product, one update, their three backward GEMMs and a gradient
    # accumulation fewer (the text condition needs no gradient)
    assert len(ops0) - len(ops1) >= 7 * layers
    assert ops0.count('mm') + ops0.count('addmm') - ops1.count('mm') - ops1.count('addmm') >= 5 * layers


def test_a_value_projected_from_another_tensor_is_computed_on_its_own(debug_lm_pkg, monkeypatch):
    from audiocraft_lora import fused_in_proj
    lm = _lm(debug_lm_pkg, True, LoRASettings(rank=4, alpha=8, init='random'))
    attention = lm.transformer.layers[0].cross_attention.eval()
    x, key, value = (torch.randn(2, 5, attention.embed_dim, generator=torch.Generator().manual_seed(i))
                     for i in range(3))
    outs = {}
    for combine in (False, True):
        monkeypatch.setattr(fused_in_proj, 'COMBINE_CROSS_KV', combine)
        outs[combine] = [attention(x, key, value, need_weights=False)[0],  # key is not value: no pairing
                         attention(x, key, key, need_weights=False)[0]]
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=0, rtol=0)
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=0, rtol=0)
    assert not torch.allclose(outs[True][0], outs[True][1])  # the value's own input was used
    assert attention._lora_pending is None  # nothing left over after a forward


def test_kept_merged_weights_give_the_same_step_with_one_gemm_fewer_per_projection(debug_lm_pkg):
    from audiocraft_lora.speed import set_keep_merged
    # training-sized batches (rows > 2 x the input width, linear2's 128 included) and no LoRA dropout: merged path
    codes = torch.randint(0, 256, (2, 4, 200), generator=torch.Generator().manual_seed(0))
    lm = _lm(debug_lm_pkg, True, LoRASettings(rank=4, alpha=8, init='random', dropout=0.0))
    projections = set_keep_merged(lm, False)
    assert projections == 6 * len(lm.transformer.layers)  # 4 peft linears + 2 fused q/k/v attentions a layer
    results = {}
    for keep in (False, True):
        set_keep_merged(lm, keep)
        kept = []  # shapes of what autograd saves for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            results[keep] = _step_ops(lm, codes)
        results[keep] += (kept,)
    (loss0, grads0, ops0, saved0), (loss1, grads1, ops1, saved1) = results[False], results[True]
    assert torch.equal(loss1, loss0)
    for key in grads0:
        assert torch.equal(grads1[key], grads0[key]), key
    # each layer's 6 but the first layer's q/k/v (its input needs no gradient, so no dx: nothing to keep); the
    # cross-attention's key/value (a few rows) are not merged
    merged_projections = 6 * len(lm.transformer.layers) - 1
    assert ops0.count('addmm') - ops1.count('addmm') == merged_projections
    weights = {tuple(p.shape) for n, p in lm.named_parameters() if 'lora' not in n and p.dim() == 2}
    assert sum(s in weights for s in saved1) - sum(s in weights for s in saved0) >= merged_projections


@pytest.mark.parametrize('mode, fraction, rest', [('selective', 1.0, 'none'), ('torch', 1.0, 'none'),
                                                  ('torch', 0.5, 'selective')])
def test_kept_merged_weights_under_activation_checkpointing_give_the_same_step(debug_lm_pkg, mode, fraction, rest):
    """keep_merged_weights with each checkpointing plan (auto may pick any of them with it): the merged weights a
    recomputed forward keeps are the same values, so loss and gradients are those of the plain step."""
    from audiocraft_lora.speed import set_keep_merged
    codes = torch.randint(0, 256, (2, 4, 200), generator=torch.Generator().manual_seed(0))  # merged path
    settings = LoRASettings(rank=4, alpha=8, init='random', dropout=0.0)
    results = []
    for keep, checkpointing in ((False, 'none'), (True, mode)):
        torch.manual_seed(0)
        lm = _lm(debug_lm_pkg, True, settings)
        apply_to_model(lm, SpeedSettings(activation_checkpointing=checkpointing, checkpoint_fraction=fraction,
                                         checkpoint_rest=rest if checkpointing != 'none' else 'none'),
                       False, torch.bfloat16)
        assert set_keep_merged(lm, keep) > 0
        results.append(_train_step(lm, codes))
    _assert_same_step(*results)
