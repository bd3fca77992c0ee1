"""lora.compile: transformer layers compiled in place give the eager results, keep their names, and generate eagerly."""
import copy
import json

import pytest
import torch

from audiocraft_lora.errors import LoRAConfigError
from audiocraft_lora.lora import AdapterParameters, LoRASettings, inject_lora
from audiocraft_lora.speed import SpeedSettings, apply_to_model
from helpers import DEBUG_ARGS, build_solver, conditioned_logits, run_dora


def _loss_and_grads(lm, codes, text):
    lm.train()
    for p in lm.parameters():
        p.grad = None
    from audiocraft.modules.conditioners import ConditioningAttributes
    attributes = [ConditioningAttributes(text={'description': t}) for t in text]
    condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
    out = lm.compute_predictions(codes, [], condition_tensors)
    loss = torch.nan_to_num(out.logits).float().pow(2).mean()
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in AdapterParameters(lm).named_parameters()}


def _eager_and_compiled(debug_lm_pkg, settings: SpeedSettings):
    """(eager LM with random LoRA, its copy with `settings` applied in float32, apply_to_model's info)."""
    from audiocraft.modules.transformer import set_efficient_attention_backend
    from audiocraft_lora import base_models
    set_efficient_attention_backend('torch')
    torch._dynamo.reset()
    lm = base_models.build_lm(debug_lm_pkg)
    inject_lora(lm, LoRASettings(rank=4, dropout=0.0, init='random'))
    compiled = copy.deepcopy(lm)
    info = apply_to_model(compiled, settings, autocast=False, autocast_dtype=torch.float32)
    return lm, compiled, info


def test_compiled_layers_match_eager_and_keep_names(debug_lm_pkg):
    lm, compiled, info = _eager_and_compiled(debug_lm_pkg, SpeedSettings(compile='aot_eager'))
    assert info['compile'] == 'aot_eager'
    assert list(compiled.state_dict()) == list(lm.state_dict())  # nn.Module.compile: no `_orig_mod` in names
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    text = ['trap beat', 'lofi']
    loss, grads = _loss_and_grads(lm, codes, text)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, codes, text)
    assert compiled_loss == pytest.approx(loss, rel=1e-6)
    assert all(torch.allclose(compiled_grads[k], grads[k], atol=1e-7) for k in grads)
    assert torch.allclose(conditioned_logits(compiled, codes, text), conditioned_logits(lm, codes, text), atol=1e-6)


def test_each_compiled_layer_is_one_graph_without_breaks(debug_lm_pkg):
    """AudioCraft's causal mask object and xformers' unbind broke every self-attention's graph, and dynamo then ran
    the whole layer eagerly: lora.compile compiled nothing of the self-attention."""
    from audiocraft.modules.transformer import set_efficient_attention_backend
    from torch._dynamo.utils import counters
    from audiocraft_lora import base_models
    set_efficient_attention_backend('torch')
    torch._dynamo.reset()
    counters.clear()
    lm = base_models.build_lm(debug_lm_pkg)
    inject_lora(lm, LoRASettings(rank=4, dropout=0.1, init='random'))
    apply_to_model(lm, SpeedSettings(compile='aot_eager'), autocast=False, autocast_dtype=torch.float32)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    _loss_and_grads(lm, codes, ['trap beat', 'lofi'])
    assert not counters['graph_break'], dict(counters['graph_break'])
    # one graph for the first layer (its input needs no gradient) and one the other layers share
    assert counters['stats']['unique_graphs'] == min(2, len(lm.transformer.layers))


def test_compiled_layers_under_autocast_stay_one_graph_and_match_eager(debug_lm_pkg):
    """Under autocast the layer norms carry lora.attention_in_autocast_dtype's forward hooks: traced, not broken."""
    from audiocraft.modules.transformer import set_efficient_attention_backend
    from torch._dynamo.utils import counters
    from audiocraft_lora import base_models
    set_efficient_attention_backend('torch')
    torch._dynamo.reset()
    counters.clear()
    lm = base_models.build_lm(debug_lm_pkg)
    inject_lora(lm, LoRASettings(rank=4, dropout=0.0, init='random'))
    eager = copy.deepcopy(lm)
    apply_to_model(eager, SpeedSettings(), autocast=True, autocast_dtype=torch.bfloat16)
    info = apply_to_model(lm, SpeedSettings(compile='aot_eager'), autocast=True, autocast_dtype=torch.bfloat16)
    assert info['attention_in_autocast_dtype'] > 0
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(eager, codes, ['trap beat', 'lofi'])
        compiled_loss, compiled_grads = _loss_and_grads(lm, codes, ['trap beat', 'lofi'])
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == min(2, len(lm.transformer.layers))
    assert compiled_loss == loss
    assert all(torch.equal(compiled_grads[k], grads[k]) for k in grads)


def test_the_traceable_mask_is_audiocrafts_wherever_it_is_more_than_is_causal(debug_lm_pkg):
    from audiocraft.modules import transformer
    from audiocraft_lora import base_models
    from audiocraft_lora.compiling import causal_marker_masks
    lm = base_models.build_lm(debug_lm_pkg)
    assert causal_marker_masks(lm) == len(lm.transformer.layers)  # self-attention only, not cross-attention
    attention = lm.transformer.layers[0].self_attn
    try:
        transformer.set_efficient_attention_backend('torch')
        assert attention._get_mask(30, torch.device('cpu'), torch.float32) is True
        assert attention._get_mask(1, torch.device('cpu'), torch.float32) is None  # one step: no mask at all
        transformer.set_efficient_attention_backend('xformers')
        assert type(attention._get_mask(30, torch.device('cpu'), torch.float32)).__name__ == 'LowerTriangularMask'
    finally:
        transformer.set_efficient_attention_backend('torch')


@pytest.mark.parametrize('checkpointing', [{'activation_checkpointing': 'selective'},
                                           {'activation_checkpointing': 'torch', 'checkpoint_fraction': 0.5,
                                            'checkpoint_rest': 'selective'}])
def test_compiled_layers_under_checkpointing_match_eager(debug_lm_pkg, checkpointing):
    lm, compiled, _ = _eager_and_compiled(debug_lm_pkg, SpeedSettings(compile='aot_eager', **checkpointing))
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(lm, codes, ['trap beat', 'lofi'])
    compiled_loss, compiled_grads = _loss_and_grads(compiled, codes, ['trap beat', 'lofi'])
    assert compiled_loss == pytest.approx(loss, rel=1e-6)
    assert all(torch.allclose(compiled_grads[k], grads[k], atol=1e-7) for k in grads)


def test_unknown_compile_backend_is_refused():
    with pytest.raises(LoRAConfigError, match=r"lora.compile='tensorrtx' is not a torch.compile backend"):
        SpeedSettings(compile='tensorrtx').validate()
    with pytest.raises(LoRAConfigError, match=r"compile_mode=reduce-overhead is a mode of inductor"):
        SpeedSettings(compile='aot_eager', compile_mode='reduce-overhead').validate()
    with pytest.raises(LoRAConfigError, match=r"lora.compile_mode must be one of"):
        SpeedSettings(compile='inductor', compile_mode='fast').validate()


def test_inductor_in_reduce_overhead_mode_matches_eager(debug_lm_pkg):
    """inductor itself, in the mode that replays CUDA graphs on a GPU (skipped on CPU tensors: its kernels)."""
    settings = SpeedSettings(compile='inductor', compile_mode='reduce-overhead')
    assert settings.cuda_graphs
    lm, compiled, info = _eager_and_compiled(debug_lm_pkg, settings)
    assert info['compile'] == 'inductor (reduce-overhead)'
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    text = ['trap beat', 'lofi']
    loss, grads = _loss_and_grads(lm, codes, text)
    torch.compiler.cudagraph_mark_step_begin()
    compiled_loss, compiled_grads = _loss_and_grads(compiled, codes, text)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    assert all(torch.allclose(compiled_grads[k], grads[k], rtol=1e-4, atol=1e-6) for k in grads)


def test_every_solver_step_starts_a_cuda_graph_iteration_with_reduce_overhead(dora_dir, monkeypatch):
    solver, _ = build_solver(DEBUG_ARGS)
    marks = []
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(solver.is_training))
    batch = next(iter(solver.dataloaders['train']))
    solver._current_stage = 'train'
    solver.model.train()
    solver.run_step(0, batch, {})
    assert marks == []  # eager layers: nothing to mark
    solver.speed_settings = SpeedSettings(compile='inductor', compile_mode='reduce-overhead')  # (layers left eager)
    solver.run_step(1, batch, {})
    solver._current_stage = 'valid'
    solver.model.eval()
    with torch.no_grad():
        solver.run_step(0, batch, {})
    solver._current_stage = None
    assert marks == [True, False]  # a training step and a validation step


def test_dora_run_with_compiled_layers_trains_and_generates(tmp_path):
    args = ['solver=musicgen/lora_debug', 'lora.compile=aot_eager', 'optim.updates_per_epoch=3',
            'dataset.valid.num_samples=4', 'generate.every=2']
    proc = run_dora(args, tmp_path / 'outputs')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'compile': 'aot_eager'" in proc.stdout + proc.stderr
    (folder,) = [p for p in (tmp_path / 'outputs' / 'xps').iterdir() if p.is_dir()]
    history = json.loads((folder / 'history.json').read_text())
    assert len(history) == 2 and history[-1]['generate']['gen_count'] == 2  # generation ran (eagerly)
    assert all(torch.isfinite(torch.tensor(epoch['train']['ce'])) for epoch in history)
