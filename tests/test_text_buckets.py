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
    graphs.buckets.applied = lambda padded: contextlib.nullcontext()  # (no mask)
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
