"""lora.graph_text_bucket: graphed steps pad the text conditioning to a few lengths and mask the added keys, so the
cross-attentions attend to the plain step's keys (the same values up to float summation order: a masked kernel);
on CPU with torch's capture function stood in for (test_layer_graphs.RecordingCapture), in float64: there the
summation order moves results by ~1e-14, so a key attended wrongly can't hide in the tolerance (in float32 some
adapter gradients, sums with cancellation, move by up to 2e-5 of their largest entry)."""
import contextlib
import copy
import logging

import pytest
import torch

from audiocraft_lora import layer_graphs, memory_plan, text_buckets
from audiocraft_lora.errors import LoRAConfigError
from audiocraft_lora.lora import AdapterParameters
from audiocraft_lora.speed import SpeedSettings
from test_layer_graphs import RecordingCapture, _lm, _on_two_ranks, _rank_steps, _solver


def _step(lm, codes, length):
    """Loss, adapter gradients and the text conditioning's gradient of one training step with `length` text tokens,
    the last two of them AudioCraft's padding of a shorter description (zeros)."""
    lm.train()
    for p in lm.parameters():
        p.grad = None
    text = torch.randn(codes.shape[0], length, lm.dim, generator=torch.Generator().manual_seed(length),
                       dtype=next(lm.parameters()).dtype)
    text[0, -2:] = 0
    text.requires_grad_(True)
    out = lm.compute_predictions(codes, [], {'description': (text, torch.ones(codes.shape[0], length))})
    loss = torch.nan_to_num(out.logits).float().pow(2).mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in AdapterParameters(lm).named_parameters()}
    return loss.item(), grads, text.grad


def _lm64(debug_lm_pkg, **kwargs):
    return _lm(debug_lm_pkg, **kwargs).double()


def _close(a, b):
    """Equal up to float64 summation order: the largest difference within 1e-10 of the largest magnitude."""
    return bool((a - b).abs().max() <= 1e-10 * b.abs().max())


def _same_step(step, ref_step):
    (loss, grads, text_grad), (ref_loss, ref_grads, ref_text_grad) = step, ref_step
    return (_close(torch.tensor(loss), torch.tensor(ref_loss)) and all(_close(grads[k], ref_grads[k]) for k in grads)
            and _close(text_grad, ref_text_grad))


def test_padded_lengths():
    assert [text_buckets.padded_length(n, 32) for n in (1, 31, 32, 33, 64)] == [32, 32, 32, 64, 64]
    assert text_buckets.padded_length(7, 1) == 7


def test_lengths_share_a_padded_signature_and_attend_to_the_plain_keys(debug_lm_pkg):
    lm = _lm64(debug_lm_pkg, layers=4)
    reference = copy.deepcopy(lm)
    capture = RecordingCapture()
    graphs = layer_graphs.install(lm, max_shapes=2, capture=capture, device_type='cpu', text_bucket=8)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    for length in (3, 9, 5, 12, 8):  # padded to 8, 16, 8, 16, 8: two signatures for five lengths
        assert _same_step(_step(lm, codes, length), _step(reference, codes, length)), length
        mask = graphs.buckets.masks[(text_buckets.padded_length(length, 8), torch.device('cpu'))]
        assert mask.tolist() == [True] * length + [False] * (len(mask) - length)
    assert [call['samples'][0][1].shape[1] for call in capture.calls] == [8, 16]
    n = len(lm.transformer.layers)
    assert graphs.stats['graphed_calls'] == 5 * n and graphs.stats['eager_calls'] == 0
    assert 'padded to multiples of 8 tokens' in graphs.summary()


def test_the_added_keys_change_the_step_unless_masked(debug_lm_pkg):
    """The comparison above can tell: the same padding without the mask (AudioCraft attending to the zeros) gives
    another step."""
    lm = _lm64(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    graphs = layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    graphs.buckets.applied = lambda padded, mask=None: contextlib.nullcontext()  # (no mask)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(1))
    assert not _same_step(_step(lm, codes, 3), _step(reference, codes, 3))


def test_steps_beyond_graph_shapes_mask_the_keys_when_recomputed(debug_lm_pkg):
    """A step whose padded length has no graph runs eagerly, each layer recomputed in backward: the recomputation
    must apply the mask too, or the gradients come from other activations than the forward's."""
    lm = _lm64(debug_lm_pkg, dropout=0.1)
    reference = copy.deepcopy(lm)
    graphs = layer_graphs.install(lm, max_shapes=1, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(2))
    for length in (3, 12, 3):
        results = []
        for model in (lm, reference):
            torch.manual_seed(length)  # (the dropout masks)
            results.append(_step(model, codes, length))
        assert _same_step(*results), length
    n = len(lm.transformer.layers)
    assert graphs.stats['graphed_calls'] == 2 * n and graphs.stats['eager_calls'] == n


def test_eval_calls_between_steps_are_unpadded_and_remove_restores_the_attention(debug_lm_pkg):
    from helpers import conditioned_logits
    lm = _lm64(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(3))
    _step(lm, codes, 3)
    _step(reference, codes, 3)
    text = ['trap beat', 'lofi']
    assert torch.equal(conditioned_logits(lm, codes, text), conditioned_logits(reference, codes, text))
    assert all('forward' in layer.cross_attention.__dict__ for layer in lm.transformer.layers)
    layer_graphs.remove(lm)
    assert not any('forward' in layer.cross_attention.__dict__ for layer in lm.transformer.layers)
    assert _step(lm, codes, 5)[0] == _step(reference, codes, 5)[0]  # (the plain attention: bit for bit)


def test_a_cross_attention_that_takes_no_mask_raises(debug_lm_pkg):
    """If the cross-attention computes without `scaled_dot_product_attention` (here: AudioCraft's einsum path), the
    added keys would be attended: that must stop with the fix, not train on other values."""
    lm = _lm(debug_lm_pkg)
    layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    for layer in lm.transformer.layers:
        layer.cross_attention.memory_efficient = False
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match='lora.graph_text_bucket=1'):
        _step(lm, codes, 3)


def test_attention_that_cant_be_masked_keeps_exact_lengths(debug_lm_pkg, monkeypatch, caplog):
    from audiocraft.modules import transformer
    lm = _lm(debug_lm_pkg)
    monkeypatch.setattr(transformer, '_efficient_attention_backend', 'xformers')
    with caplog.at_level(logging.INFO, logger='audiocraft_lora.layer_graphs'):
        graphs = layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    assert graphs.buckets is None and "backend is 'xformers'" in caplog.text
    assert not any('forward' in layer.cross_attention.__dict__ for layer in lm.transformer.layers)


def test_the_setting_reaches_the_graphs_and_is_validated(debug_lm_pkg):
    lm = _lm(debug_lm_pkg)
    memory_plan.plan_graphs(_solver(lm))
    assert layer_graphs.installed(lm).buckets.multiple == 32  # the default
    memory_plan.plan_graphs(_solver(lm, graph_text_bucket=1))
    assert layer_graphs.installed(lm).buckets is None
    for bad in (0, 2.5, True):
        with pytest.raises(LoRAConfigError, match=r'lora\.graph_text_bucket must be a whole number >= 1'):
            SpeedSettings(graph_text_bucket=bad).validate()


def test_solver_steps_with_padded_text_match_eager_ones(dora_dir):
    """The solver's own steps (AudioCraft's conditioner and fuser, CFG, cross-entropy, AdamW), LoRA dropout 0.1,
    the debug conditioner's text padded to 32 tokens in graphed steps: eager's cross-entropies up to float32
    summation order."""
    import random
    import sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))
    from cuda_checks import fit_one_batch
    installed, captures = [], RecordingCapture()

    def graphed(solver):
        installed.append(layer_graphs.install(solver.model, capture=captures, device_type='cpu', text_bucket=32))

    def seeded(**kwargs):  # (the LoRA init, the batch and the dropout masks)
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        return fit_one_batch(['device=cpu', 'autocast=false', 'lora.dropout=0.1'], steps=5, **kwargs)
    eager = seeded()
    padded = seeded(prepare=graphed)
    assert max(abs(a - b) for a, b in zip(padded, eager)) < 1e-5 * eager[0]
    assert installed[0].stats['graphed_calls'] == 5 * len(installed[0].layers)
    assert [call['samples'][0][1].shape[1] for call in captures.calls] == [32]


def test_ranks_with_different_lengths_replay_every_step(debug_lm_pkg, tmp_path):
    """With DDP a step is graphed only where every rank has its signature: at exact lengths the ranks below ran 3 of
    4 steps eagerly (test_layer_graphs.test_ranks_agree_on_every_step); padded to 8 they share one signature."""
    ranks = _on_two_ranks(_rank_steps, tmp_path, debug_lm_pkg, {0: [2, 5, 2, 7], 1: [2, 2, 5, 2]}, 8)
    assert ranks[0]['graphed'] == ranks[1]['graphed'] == [True] * 4
    assert all(rank['stats']['eager_calls'] == 0 for rank in ranks)


def test_an_attention_kernel_that_fails_on_the_mask_names_the_setting(debug_lm_pkg):
    """An attention kernel that refuses the mask (here: torch's own, given a mask of a dtype it refuses) must say
    which setting takes the mask away."""
    lm = _lm(debug_lm_pkg)
    graphs = layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    mask_for = graphs.buckets.mask_for
    graphs.buckets.mask_for = lambda padded: mask_for(padded).double()
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match=r'attn_mask.*Set lora\.graph_text_bucket=1'):
        _step(lm, codes, 3)


class _WarmingUpCapture(RecordingCapture):
    """As make_graphed_callables, runs each callable once on its samples before capturing (where a kernel that
    refuses the mask fails)."""

    def __call__(self, callables, samples, num_warmup_iters=3, pool=None):
        with torch.enable_grad():
            for call, sample in zip(callables, samples):
                call(*sample)
        return super().__call__(callables, samples, num_warmup_iters, pool)


def test_a_capture_refused_by_the_mask_goes_on_with_graphs_at_exact_lengths(debug_lm_pkg, caplog):
    """A GPU whose attention kernels refuse the mask loses the padding, not the graphs (at batch 4 those are ~3x the
    speed): the step is captured again at its own text length and replays from then on, as the plain step."""
    lm = _lm(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    capture = _WarmingUpCapture()
    graphs = layer_graphs.install(lm, capture=capture, device_type='cpu', text_bucket=8)
    mask_for = graphs.buckets.mask_for
    graphs.buckets.mask_for = lambda padded: mask_for(padded).double()  # (torch's kernels refuse this dtype)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.WARNING, logger='audiocraft_lora.layer_graphs'):
        for length in (3, 5):
            loss, grads, _ = _step(lm, codes, length)
            ref_loss, ref_grads, _ = _step(reference, codes, length)
            assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    assert graphs.buckets is None and "can't take the text mask" in caplog.text
    assert [call['samples'][0][1].shape[1] for call in capture.calls] == [3, 5]  # (the padded one failed)
    assert graphs.stats['graphed_calls'] == 2 * len(lm.transformer.layers) and not graphs.failed
    assert not any('forward' in layer.cross_attention.__dict__ for layer in lm.transformer.layers)


def test_each_step_refills_the_mask_its_graph_captured(debug_lm_pkg, monkeypatch):
    """A replay reads the tensors its capture saw, where they were: the mask of a padded length must be one tensor,
    filled in place at every step (the CPU stand-in looks it up again at each replay, so this is asked directly)."""
    seen = []
    init = text_buckets._KeyMask.__init__
    monkeypatch.setattr(text_buckets._KeyMask, '__init__', lambda self, mask: (seen.append(mask), init(self, mask))[1])
    lm = _lm(debug_lm_pkg)
    graphs = layer_graphs.install(lm, capture=_WarmingUpCapture(), device_type='cpu', text_bucket=8)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(7))
    _step(lm, codes, 3)
    mask = graphs.buckets.masks[(8, torch.device('cpu'))]
    _step(lm, codes, 5)
    assert seen and all(m is mask for m in seen)
    assert graphs.buckets.masks[(8, torch.device('cpu'))] is mask and mask.tolist() == [True] * 5 + [False] * 3


def test_an_eager_step_is_recomputed_under_its_own_mask(debug_lm_pkg):
    """A step beyond graph_shapes is recomputed in backward; if another forward of the same padded length ran in
    between (refilling the shared mask), the recomputation must still see the mask of its own forward."""
    lm = _lm64(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    layer_graphs.install(lm, max_shapes=1, capture=RecordingCapture(), device_type='cpu', text_bucket=8)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(8))
    _step(lm, codes, 12)  # (the one signature: 16)
    grads = []
    for model in (lm, reference):
        model.train()
        model.zero_grad(set_to_none=True)
        losses = []
        for length in (3, 5):  # two forwards of padded length 8, then the first one's backward
            text = torch.randn(2, length, model.dim, generator=torch.Generator().manual_seed(length),
                               dtype=torch.float64)
            out = model.compute_predictions(codes, [], {'description': (text, torch.ones(2, length))})
            losses.append(torch.nan_to_num(out.logits).pow(2).mean())
        losses[0].backward()
        grads.append({k: p.grad.clone() for k, p in AdapterParameters(model).named_parameters()})
    assert all(_close(grads[0][k], grads[1][k]) for k in grads[1])


def test_with_no_room_for_a_graph_a_step_takes_a_longer_captured_one(debug_lm_pkg):
    """Masked keys make any longer padding exact: when a step's padded length has no graph and graph_shapes are
    taken, it is padded to the shortest captured length that holds it; only a text longer than every graph's runs
    eagerly."""
    lm = _lm64(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    capture = RecordingCapture()
    graphs = layer_graphs.install(lm, max_shapes=1, capture=capture, device_type='cpu', text_bucket=8)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(9))
    padded = []
    for length in (12, 3, 20, 5):  # 16 captured; 3 and 5 replay it; 20 (24) is longer: eager
        assert _same_step(_step(lm, codes, length), _step(reference, codes, length)), length
        padded.append(graphs.active and graphs.active[3][1])
    assert padded == [16, 16, None, 16] and len(capture.calls) == 1
    n = len(lm.transformer.layers)
    assert graphs.stats['graphed_calls'] == 3 * n and graphs.stats['eager_calls'] == n
