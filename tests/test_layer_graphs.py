"""lora.graph_layers: which calls the CUDA graphs of the layers take, how they are captured, and when the solver
turns them on. The graphs themselves need a GPU (benchmarks/cuda_checks.py checks their losses against eager steps);
here torch's capture function is stood in for by one that returns the callables it was given (what a graph replays
is what they compute), so the dispatch runs on CPU."""
import copy
import functools
import logging
import types
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from audiocraft_lora import layer_graphs, memory_plan, recompute
from audiocraft_lora.errors import LoRAConfigError
from audiocraft_lora.lora import AdapterParameters, LoRASettings, inject_lora
from audiocraft_lora.speed import SpeedSettings, apply_to_model


class _Replay(torch.autograd.Function):
    """What torch's graphed callable does with its static tensors, eagerly: the arguments are copied into the capture's
    sample tensors (unless they are those), the callable runs on them, its outputs come back detached, and backward
    takes the gradients of the samples and parameters. (The copies go through `.data`, as a graph replay bumps no
    version counter: a static tensor reused too early gives wrong values here, as it would on a GPU.)"""

    @staticmethod
    def forward(ctx, graph, *inputs):
        args = inputs[:len(graph.samples)]
        for static, arg in zip(graph.samples, args):
            if static.data_ptr() != arg.data_ptr():
                static.data.copy_(arg)
        with torch.enable_grad():
            graph.output = graph.callable(*graph.samples)
        ctx.graph = graph
        return graph.output.detach()

    @staticmethod
    def backward(ctx, grad):
        graph = ctx.graph
        wanted = [t for t in graph.samples if t.requires_grad] + graph.params
        grads = iter(torch.autograd.grad(graph.output, wanted, grad))
        sample_grads = [next(grads) if t.requires_grad else None for t in graph.samples]
        return (None, *sample_grads, *grads)


class _Graph:
    def __init__(self, callable, samples):
        self.callable, self.samples = callable, samples
        self.params = [p for p in callable.parameters() if p.requires_grad]

    def __call__(self, *args):
        return _Replay.apply(self, *args, *self.params)


def _failing_capture(callables, samples, num_warmup_iters=3, pool=None):
    raise RuntimeError('operation not permitted when stream is capturing')


class RecordingCapture:
    """make_graphed_callables' signature and, eagerly, its graphs' semantics (`_Replay`); records each capture."""

    def __init__(self):
        self.calls = []

    def __call__(self, callables, samples, num_warmup_iters=3, pool=None):
        self.calls.append({'callables': callables, 'samples': samples, 'pool': pool, 'warmups': num_warmup_iters})
        return tuple(_Graph(c, s) for c, s in zip(callables, samples))


def _lm(debug_lm_pkg, dropout=0.0, layers=None):
    """The debug LM with random LoRA (fast path); `layers`: that many transformer layers, random weights (the debug
    LM has 2: static tensors shared between the third layer and the second would go unseen)."""
    from audiocraft.models import builders
    from audiocraft.modules.transformer import set_efficient_attention_backend
    from omegaconf import OmegaConf
    from audiocraft_lora import base_models
    set_efficient_attention_backend('torch')
    if layers is None:
        lm = base_models.build_lm(debug_lm_pkg)
    else:
        cfg = base_models.lm_config(debug_lm_pkg)
        OmegaConf.set_struct(cfg, False)
        cfg.transformer_lm.num_layers, cfg.device, cfg.dtype = layers, 'cpu', 'float32'
        torch.manual_seed(0)
        lm = builders.get_lm_model(cfg)
    inject_lora(lm, LoRASettings(rank=4, dropout=dropout, init='random'))
    apply_to_model(lm, SpeedSettings(), autocast=False, autocast_dtype=torch.float32)
    return lm


def _step(lm, codes, length):
    """Loss and adapter gradients of one training forward/backward on `codes`, with a text conditioning of `length`
    tokens (what a batch's longest description gives; the debug LM's own conditioner gives one token)."""
    lm.train()
    for p in lm.parameters():
        p.grad = None
    generator = torch.Generator().manual_seed(length)
    text = torch.randn(codes.shape[0], length, lm.dim, generator=generator)
    out = lm.compute_predictions(codes, [], {'description': (text, torch.ones(codes.shape[0], length))})
    loss = torch.nan_to_num(out.logits).float().pow(2).mean()
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in AdapterParameters(lm).named_parameters()}


LENGTHS = [2, 5, 2, 7, 5]


def test_one_capture_per_text_length_of_the_whole_stack_with_a_shared_input_and_pool(debug_lm_pkg):
    lm = _lm(debug_lm_pkg, layers=4)
    reference = copy.deepcopy(lm)
    capture, pool = RecordingCapture(), object()
    graphs = layer_graphs.install(lm, max_shapes=2, capture=capture, device_type='cpu')
    graphs.pool = pool
    layers = list(lm.transformer.layers)
    runs = []  # layer forwards a step (the stand-in's replays run the captured callable: one each)
    for layer in layers:
        layer.forward = functools.partial(lambda f, *a, **k: runs.append(1) or f(*a, **k), layer.forward)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    lengths, counts = [], []
    for length in LENGTHS:
        runs.clear()
        loss, grads = _step(lm, codes, length)
        counts.append(len(runs))
        ref_loss, ref_grads = _step(reference, codes, length)
        assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
        lengths.append(graphs.active and graphs.active[3][1])
    n = len(layers)
    # the second signature's warmup runs each layer, checkpointed (again in backward), before its capture; the step
    # beyond graph_shapes recomputes each layer too
    assert counts == [n, 3 * n, n, 2 * n, n], counts
    # lengths 2 (twice): one signature; 5 the second; 7 is beyond max_shapes=2 and runs eagerly; 5 replays again
    assert len(capture.calls) == 2
    for call in capture.calls:
        # one callable of all layers in order (one forward and one backward graph), one shared pool
        (stack,), ((x, _),) = call['callables'], call['samples']
        assert list(stack.layers) == layers and call['pool'] is pool
        assert not x.requires_grad  # (the embeddings are frozen)
    (first,), (second,) = (call['samples'] for call in capture.calls)
    assert first[0] is second[0]  # the stack's input shared by the signatures
    assert first[1].shape[1] != second[1].shape[1]  # (text lengths 2 and 5)
    # torch's warmup (whole steps outside the pool) for the first only; later ones warmed up layer by layer, recomputed
    assert [call['warmups'] for call in capture.calls] == [3, 0] and graphs.stats['warmups'] == 1
    assert lengths[3] is None and lengths[0] == lengths[2] and lengths[1] == lengths[4]
    assert graphs.stats['graphed_calls'] == 4 * n and graphs.stats['eager_calls'] == n
    assert 'beyond lora.graph_shapes=2' in graphs.summary()


def test_eval_no_grad_and_off_device_calls_run_eagerly(debug_lm_pkg):
    from helpers import conditioned_logits
    lm = _lm(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    capture = RecordingCapture()
    graphs = layer_graphs.install(lm, capture=capture, device_type='cpu')
    codes = torch.randint(0, 256, (1, 4, 30), generator=torch.Generator().manual_seed(1))
    text = ['trap beat']
    assert torch.equal(conditioned_logits(lm, codes, text), conditioned_logits(reference, codes, text))
    lm.train()
    with torch.no_grad():  # training mode without grad
        lm.transformer(torch.randn(2, 30, lm.dim), cross_attention_src=torch.randn(2, 3, lm.dim))
    assert capture.calls == [] and graphs.stats['graphed_calls'] == graphs.stats['eager_calls'] == 0
    cuda_graphs = layer_graphs.install(lm, capture=capture)  # the real device type: these CPU calls aren't its
    _step(lm, codes, 3)
    assert capture.calls == [] and cuda_graphs.stats['graphed_calls'] == 0


def test_a_step_the_stack_cant_stand_for_runs_every_layer_once_as_without_the_graphs(debug_lm_pkg, caplog):
    """The first layer's call replays every layer: a step where a later layer is in eval mode or has forward hooks of
    its own (which a replay wouldn't run) runs each layer once, eagerly; a later layer given another tensor than
    the stack's output runs on it."""
    lm = _lm(debug_lm_pkg, layers=3)
    reference = copy.deepcopy(lm)
    graphs = layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu')
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(9))
    calls = []
    for model in (lm, reference):
        for layer in model.transformer.layers:
            layer.forward = functools.partial(lambda f, *a, **k: calls.append(1) or f(*a, **k), layer.forward)
    _step(lm, codes, 2)  # captured and replayed
    assert graphs.stats['graphed_calls'] == 3
    def stays_in_eval(model):  # (through _step's model.train())
        layer = model.transformer.layers[1]
        layer.eval()
        layer.train = lambda mode=True: layer
    for prepare, hooks in ((stays_in_eval, 0),
                           (lambda m: m.transformer.layers[2].register_forward_hook(lambda *a: calls.append('h')), 2),
                           (lambda m: m.transformer.layers[1].register_forward_pre_hook(lambda *a: calls.append('h')),
                            4)):
        prepare(lm)
        prepare(reference)
        calls.clear()
        loss, grads = _step(lm, codes, 2)
        ref_loss, ref_grads = _step(reference, codes, 2)
        assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
        assert calls.count(1) == 2 * 3 and calls.count('h') == hooks, calls  # each layer once a model, no recompute
        for model in (lm, reference):
            model.transformer.layers[1].__dict__.pop('train', None)
    assert graphs.stats['graphed_calls'] == 3 and graphs.stats['eager_calls'] == 0
    with caplog.at_level(logging.WARNING, logger='audiocraft_lora.layer_graphs'):
        layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu')
    assert 'have forward hooks' in caplog.text
    # a later layer handed another tensor in a graphed step runs on it
    for layer in lm.transformer.layers:
        layer.train()
        layer._forward_hooks.clear()
        layer._forward_pre_hooks.clear()
    graphs = layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu')
    _step(lm, codes, 2)
    x, text = torch.randn(2, 30, lm.dim), torch.randn(2, 32, lm.dim)
    first, second = lm.transformer.layers[:2]
    out = lm.transformer._apply_layer(first, x, cross_attention_src=text)
    assert graphs.through is out
    other = torch.randn(2, 30, lm.dim)
    assert torch.equal(lm.transformer._apply_layer(second, other, cross_attention_src=text),
                       second(other, cross_attention_src=text))  # (no dropout: the layer itself on `other`)


def test_install_keeps_names_takes_shared_casts_away_and_remove_undoes_it(debug_lm_pkg):
    lm = _lm(debug_lm_pkg)
    from audiocraft_lora.adapter_casts import share_adapter_casts
    assert share_adapter_casts(lm) > 0
    names = list(lm.state_dict())
    layer_graphs.install(lm, device_type='cpu')
    assert list(lm.state_dict()) == names
    assert not any('_lora_cast_slots' in m.__dict__ for m in lm.modules())
    assert '_apply_layer' in lm.transformer.__dict__  # (the transformer's hook: the layers are untouched)
    assert not any('forward' in layer.__dict__ for layer in lm.transformer.layers)
    assert layer_graphs.installed(lm) is not None
    assert layer_graphs.remove(lm) and layer_graphs.installed(lm) is None
    assert '_apply_layer' not in lm.transformer.__dict__
    assert not layer_graphs.remove(lm)


def test_remove_lets_the_captured_graphs_go(debug_lm_pkg):
    """What holds a graph holds its memory pool: after `remove`, nothing of ours refers to the captured callables."""
    import gc
    import weakref
    lm = _lm(debug_lm_pkg)
    graphs = layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu')
    codes = torch.randint(0, 256, (1, 4, 30), generator=torch.Generator().manual_seed(2))
    _step(lm, codes, 3)
    captured = [weakref.ref(call) for call in graphs.capture.calls[0]['callables']]
    graphs.capture.calls.clear()
    layer_graphs.remove(lm)
    gc.collect()
    assert graphs.sets == {} and graphs.inputs == {} and graphs.pool is None
    assert all(ref() is None for ref in captured)


@pytest.mark.parametrize('settings, message', [
    ({'graph_layers': 'sometimes'}, 'lora.graph_layers must be auto, true or false'),
    ({'graph_shapes': 0}, 'lora.graph_shapes must be a whole number >= 1'),
    ({'graph_layers': True, 'compile': 'inductor'}, 'lora.compile=inductor'),
    ({'graph_layers': 'true', 'dropout_replay': True}, 'lora.dropout_replay=true'),
    ({'graph_layers': 'true', 'fast_path': False}, 'lora.fast_path=false'),
])
def test_settings_that_cant_be_graphed_are_refused(settings, message):
    with pytest.raises(LoRAConfigError, match=message.replace('.', r'\.')):
        SpeedSettings(**settings).validate()


def test_auto_accepts_what_true_refuses():
    for clash in ({'compile': 'inductor'}, {'dropout_replay': True},
                  {'fast_path': False}):
        SpeedSettings(graph_layers='auto', **clash).validate()  # (it turns itself off: plan_graphs)


def _solver(lm, device='cuda', budget=None, needed=None, **settings):
    cfg = types.SimpleNamespace(dataset=types.SimpleNamespace(batch_size=4, segment_duration=2.0))
    estimate = None if budget is None else {'budget_bytes': budget, 'needed_bytes': needed}
    settings = {'activation_checkpointing': 'none', **settings}  # (as plan_training leaves it: never auto)
    return types.SimpleNamespace(model=lm, device=device, cfg=cfg, memory_estimate=estimate,
                                 compression_model=types.SimpleNamespace(frame_rate=50),
                                 speed_settings=SpeedSettings(**settings),
                                 logger=logging.getLogger('test_layer_graphs'))


def test_auto_takes_the_signatures_that_fit_the_budget(debug_lm_pkg):
    lm = _lm(debug_lm_pkg)
    solver = _solver(lm)
    shared, per_shape, fallback = memory_plan.graph_static_bytes(solver, step_bytes=0)
    assert shared == 4 * 100 * lm.dim * 4  # the stack's input: batch 4 x 100 frames, float32
    adapters = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert per_shape == 2 * shared + 4 * 64 * lm.dim * 4 + 4 * adapters  # output, its gradient, text, adapter grads
    assert fallback == len(lm.transformer.layers) * shared  # (a step of nothing but its layer inputs)
    needed = 10 * 2 ** 30
    solver = _solver(lm, budget=needed + shared + fallback + 3 * per_shape + 1, needed=needed)
    assert memory_plan.plan_graphs(solver) == 3 and layer_graphs.installed(lm).max_shapes == 3
    solver = _solver(lm, budget=needed + shared + fallback + 100 * per_shape, needed=needed)
    assert memory_plan.plan_graphs(solver) == 8  # lora.graph_shapes
    assert memory_plan.plan_graphs(_solver(lm, budget=needed, needed=needed)) == 0
    assert layer_graphs.installed(lm) is None
    assert memory_plan.plan_graphs(_solver(lm, budget=needed, needed=needed, graph_layers='true')) == 1
    assert memory_plan.plan_graphs(_solver(lm)) == 8  # no budget (lora.memory_budget_gib=none): as asked


def test_graphs_stay_off_where_they_cant_apply(debug_lm_pkg, caplog):
    lm = _lm(debug_lm_pkg)
    assert memory_plan.plan_graphs(_solver(lm, device='cpu')) == 0
    with pytest.raises(LoRAConfigError, match='needs the solver on a CUDA device'):
        memory_plan.plan_graphs(_solver(lm, device='cpu', graph_layers='true'))
    assert memory_plan.plan_graphs(_solver(lm, graph_layers='false')) == 0
    with caplog.at_level(logging.INFO, logger='test_layer_graphs'):
        # what the memory plan chose (activation_checkpointing=auto resolved) rules graphs out
        assert memory_plan.plan_graphs(_solver(lm, dropout_replay=True)) == 0
    assert 'off, with lora.dropout_replay=true' in caplog.text
    assert layer_graphs.installed(lm) is None


def test_the_plan_estimates_a_checkpointed_graphed_step_with_its_dropout_masks_kept(debug_lm_pkg, caplog,
                                                                                     monkeypatch):
    """Inside the graphs a checkpointed layer keeps LoRA dropout's masks (it can't draw them again in backward), which
    the plan's estimate of a checkpointed step doesn't count: with a budget, the graphed step is estimated again as
    it will run (recompute.captured_plan), and the graphs take what fits next to that."""
    from audiocraft_lora.memory_estimate import Estimate, StepShape, estimate_step
    from audiocraft_lora.recompute import set_checkpointing
    for plan in ('selective', 'torch'):
        for dropout in (0.0, 0.1):
            lm = _lm(debug_lm_pkg, dropout=dropout)
            set_checkpointing(lm, plan)
            hook = lm.transformer.__dict__.get('_apply_layer')
            shape = StepShape(batch=2, frames=60)
            eager = estimate_step(lm, None, shape, None)
            with recompute.captured_plan(lm):
                graphed = estimate_step(lm, None, shape, None)
            assert lm.transformer.__dict__.get('_apply_layer') is hook
            # as the plan, but what LoRA dropout drew (+12% selective, +14% torch here); attention (tagged random for
            # its dropout_p) is recomputed by torch at dropout_p=0
            # (without dropout the same up to a few KiB: where the peak falls in backward, the recompute's transients)
            assert (abs(graphed.step - eager.step) <= 0.005 * eager.step if dropout == 0
                    else graphed.step > 1.1 * eager.step), (plan, dropout)
            assert memory_plan.plan_graphs(_solver(lm, activation_checkpointing=plan)) == 8  # (no budget: as asked)
    lm = _lm(debug_lm_pkg, dropout=0.1)
    set_checkpointing(lm, 'selective')
    kept = Estimate(resident=2 ** 30, step=2 ** 30)
    shared, per_shape, fallback = memory_plan.graph_static_bytes(_solver(lm), step_bytes=kept.step)
    monkeypatch.setattr(memory_plan, 'graphed_step_estimate', lambda solver, encode=True: kept)
    budget = memory_plan.needed(kept) + shared + fallback + 2 * per_shape
    for needed_by_plan in (memory_plan.needed(kept) // 2, memory_plan.needed(kept)):  # (what the plan fitted: less)
        solver = _solver(lm, budget=budget, needed=needed_by_plan, activation_checkpointing='selective')
        caplog.clear()
        with caplog.at_level(logging.INFO, logger='test_layer_graphs'):
            assert memory_plan.plan_graphs(solver) == 2  # (room for 2 signatures next to the kept masks' estimate)
        # (the log names what the masks cost where they are what keeps graphs out)
        named = 'or lora.dropout_kernel on CUDA, it keeps none' in caplog.text
        assert named == (needed_by_plan < memory_plan.needed(kept))
    # an encode planned on top (encoding.plan): the graphed step is estimated without it, and the encode counted on
    # top of it; its room serves the eager fallback step too
    asked = []
    monkeypatch.setattr(memory_plan, 'graphed_step_estimate', lambda solver, encode=True: asked.append(encode) or kept)
    encode = fallback + 2 * per_shape
    with_encode = memory_plan.needed(Estimate(resident=kept.resident, step=kept.step + encode))
    # (room for 3 signatures: no fallback left to ask for, the encode's room is more)
    solver = _solver(lm, budget=with_encode + shared + 3 * per_shape, needed=1, activation_checkpointing='selective')
    solver.memory_estimate['encode_bytes'] = encode
    assert memory_plan.plan_graphs(solver) == 3 and asked == [False]
    solver = _solver(lm, budget=with_encode + shared + 3 * per_shape, needed=1, activation_checkpointing='selective')
    solver.memory_estimate['encode_bytes'] = fallback // 2  # less than the fallback step: it asks for the rest
    less = memory_plan.needed(Estimate(resident=kept.resident, step=kept.step + fallback // 2))
    assert memory_plan.plan_graphs(solver) == min(8, (with_encode - less + 3 * per_shape - (fallback - fallback // 2))
                                                  // per_shape)
    assert solver.memory_estimate['graphed_needed_bytes'] == less  # (what gpu_peak compares the peak with)
    monkeypatch.setattr(memory_plan, 'graphed_step_estimate', lambda solver, encode=True: None)
    with caplog.at_level(logging.INFO, logger='test_layer_graphs'):
        assert memory_plan.plan_graphs(_solver(lm, budget=budget, needed=1, activation_checkpointing='selective')) == 0
    assert 'could not be estimated' in caplog.text
    with pytest.raises(LoRAConfigError, match='graph_layers=true can.t be used with lora.activation_checkpointing'):
        memory_plan.plan_graphs(_solver(lm, budget=budget, needed=1, activation_checkpointing='selective',
                                        graph_layers='true'))


def test_the_solver_estimates_its_graphed_step_as_captured(dora_dir):
    """`memory_plan.graphed_step_estimate` runs on the solver's own step (EnCodec, conditioners, LM, loss; the recipes'
    LoRA dropout 0.05, selective) and leaves the plan as it was. (At the debug sizes EnCodec's encode sets the peak,
    so the kept masks don't raise it: `captured_plan`'s own test shows them.)"""
    from helpers import DEBUG_ARGS, build_solver
    from audiocraft_lora.memory_estimate import estimate_step
    solver, _ = build_solver(DEBUG_ARGS + ['lora.activation_checkpointing=selective'])
    hook = solver.model.transformer.__dict__.get('_apply_layer')
    shape, dtype = memory_plan.step_shape(solver)
    eager = estimate_step(solver.model, solver.compression_model, shape, dtype)
    graphed = memory_plan.graphed_step_estimate(solver)
    assert graphed is not None and graphed.step >= eager.step and graphed.resident == eager.resident
    assert solver.model.transformer.__dict__.get('_apply_layer') is hook is not None


def test_steps_beyond_graph_shapes_recompute_their_layers_with_the_same_values(debug_lm_pkg):
    """The graphs' pool keeps a step's activations, so a step of a new text length beyond lora.graph_shapes must not
    keep a second set beside it: its layers save their inputs only (torch's checkpoint) and give the same results."""
    lm = _lm(debug_lm_pkg, dropout=0.1)
    reference = copy.deepcopy(lm)
    graphs = layer_graphs.install(lm, max_shapes=1, capture=RecordingCapture(), device_type='cpu')
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(3))
    _step(lm, codes, 2)  # captured

    def saved_during(model, length):
        count = [0]

        def pack(tensor):
            count[0] += 1
            return tensor
        torch.manual_seed(5)  # (the same LoRA dropout masks in both models)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, grads = _step(model, codes, length)
        return count[0], loss, grads
    saved, loss, grads = saved_during(lm, 5)
    ref_saved, ref_loss, ref_grads = saved_during(reference, 5)
    assert graphs.stats['eager_calls'] == len(lm.transformer.layers)
    assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    assert saved < ref_saved / 2, (saved, ref_saved)


def _saved_during(model, codes, length, seed):
    """(tensors autograd saved outside checkpointed regions, loss, adapter gradients) of one step whose LoRA dropout
    masks come from `seed`."""
    count = [0]

    def pack(tensor):
        count[0] += 1
        return tensor
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, grads = _step(model, codes, length)
    return count[0], loss, grads


@pytest.mark.parametrize('plan', [('selective', 1.0, 'none'), ('torch', 1.0, 'none'), ('torch', 0.5, 'selective')])
def test_checkpointing_runs_inside_the_capture_and_draws_no_mask_twice(debug_lm_pkg, plan, monkeypatch):
    """Activation checkpointing with the graphs: each layer of the captured stack recomputes in the backward graph
    what its plan leaves out (selective's policy; the whole layer; half and half), but keeps what LoRA dropout drew
    (inside a capture the generator's state can't be saved and restored around the recompute, so a mask drawn again
    would be another): the same losses and adapter gradients as steps without checkpointing, masks included. Calls
    the graphs don't take (beyond graph_shapes, eval) run as without them, and `remove` gives the plan its hook
    back."""
    from audiocraft_lora.recompute import set_checkpointing
    from helpers import conditioned_logits
    lm = _lm(debug_lm_pkg, dropout=0.1, layers=3)
    reference = copy.deepcopy(lm)  # (no checkpointing: what every plan must give)
    set_checkpointing(lm, *plan)
    hook = lm.transformer.__dict__.get('_apply_layer')  # (None: AudioCraft's own method, torch on every layer)
    graphs = layer_graphs.install(lm, max_shapes=1, capture=RecordingCapture(), device_type='cpu')
    assert set(graphs.capture_contexts) == {plan[0], plan[2]} - {'none'}
    checkpoints = []  # (inside a CUDA capture the generator's state can't be read: preserve_rng_state=False there)
    monkeypatch.setattr(recompute, 'checkpoint', lambda *a, **k: checkpoints.append(k) or checkpoint(*a, **k))
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(8))
    for step, length in enumerate((2, 2, 5)):  # captured, replayed, beyond graph_shapes (whole layers recomputed)
        saved, loss, grads = _saved_during(lm, codes, length, seed=step)
        ref_saved, ref_loss, ref_grads = _saved_during(reference, codes, length, seed=step)
        assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads), step
        assert saved < ref_saved / 2, (step, saved, ref_saved)  # (the layers' activations are checkpointed)
    assert graphs.stats['graphed_calls'] == 2 * 3 and graphs.stats['eager_calls'] == 3
    captured = [k for k in checkpoints if 'context_fn' in k]
    assert captured and all(k['preserve_rng_state'] is False for k in captured)
    assert torch.equal(conditioned_logits(lm, codes, ['trap']), conditioned_logits(reference, codes, ['trap']))
    with pytest.raises(RuntimeError, match='Remove the layers'):
        set_checkpointing(lm, 'none')
    layer_graphs.remove(lm)
    assert lm.transformer.__dict__.get('_apply_layer') is hook


def test_a_failed_capture_leaves_the_layers_eager_unless_asked_for(debug_lm_pkg, caplog):
    from audiocraft_lora.adapter_casts import share_adapter_casts

    lm = _lm(debug_lm_pkg)
    reference = copy.deepcopy(lm)
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(4))
    share_adapter_casts(lm)  # (as under autocast)
    graphs = layer_graphs.install(lm, capture=_failing_capture, device_type='cpu')
    assert not any('_lora_cast_slots' in m.__dict__ for m in lm.modules())
    with caplog.at_level(logging.WARNING, logger='audiocraft_lora.layer_graphs'):
        for length in (2, 5):
            loss, grads = _step(lm, codes, length)
            ref_loss, ref_grads = _step(reference, codes, length)
            assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    assert 'training goes on without them' in caplog.text and 'not permitted' in graphs.failed
    assert graphs.inputs == {} and graphs.pool is None
    assert any('_lora_cast_slots' in m.__dict__ for m in lm.modules())  # the eager steps' shared casts are back
    assert caplog.text.count('failed') == 1  # (tried once)
    layer_graphs.install(lm, capture=_failing_capture, device_type='cpu', strict=True)  # lora.graph_layers=true
    with pytest.raises(RuntimeError, match='not permitted.*Rerun with lora.graph_layers=false'):
        _step(lm, codes, 2)


def test_a_text_conditioning_that_needs_a_gradient_gets_it(debug_lm_pkg):
    """(A trained conditioner: its output needs a gradient, through every layer's cross-attention.)"""
    lm = _lm(debug_lm_pkg, layers=3)
    reference = copy.deepcopy(lm)
    layer_graphs.install(lm, capture=RecordingCapture(), device_type='cpu')
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(6))
    grads = []
    for model in (lm, reference):
        model.train()
        text = torch.randn(2, 4, model.dim, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        out = model.compute_predictions(codes, [], {'description': (text, torch.ones(2, 4))})
        torch.nan_to_num(out.logits).float().pow(2).mean().backward()
        grads.append(text.grad)
    assert grads[0] is not None and torch.equal(grads[0], grads[1])


def test_captures_draw_no_random_numbers_from_the_run_and_capture_thread_locally(debug_lm_pkg):
    """A capture's warmup runs the layers (LoRA dropout draws masks): done on a forked generator, the replays draw the
    masks an eager run draws, and a resumed run (capturing at other steps) the ones the uninterrupted run drew. And
    make_graphed_callables' `torch.cuda.graph` captures in thread-local mode (a pin-memory thread can't break it)."""
    seen = []

    class WarmingCapture(RecordingCapture):
        def __call__(self, callables, samples, num_warmup_iters=3, pool=None):
            seen.append(torch.cuda.graph.keywords.get('capture_error_mode'))
            torch.rand(1000)  # (the warmup's draws)
            return super().__call__(callables, samples, num_warmup_iters, pool)
    lm = _lm(debug_lm_pkg, dropout=0.1)
    reference = copy.deepcopy(lm)
    layer_graphs.install(lm, capture=WarmingCapture(), device_type='cpu')
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(8))
    for length in (2, 5, 2):  # two captures
        results = []
        for model in (lm, reference):
            torch.manual_seed(length)
            results.append(_step(model, codes, length))
        (loss, grads), (ref_loss, ref_grads) = results
        assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    assert seen == ['thread_local', 'thread_local']
    assert not isinstance(torch.cuda.graph, functools.partial)  # restored


def _rank_main(rank, fn, args, init_file, out):
    """Rank `rank` of two gloo processes: `fn(rank, *args)`, its result written as JSON for `_on_two_ranks`.

    A rank that returned leaves with `os._exit`, skipping the interpreter's finalization: there a gloo worker thread
    still dropping its last reference to a collective's tensor (whose Python object is gone) takes the GIL, and
    Python ends that thread through C++ code that can't unwind: "terminate called without an active exception",
    SIGABRT, about once in 50 runs on a loaded machine (pytorch PR #179291)."""
    import json
    import os
    import datetime  # (a rank left waiting in a collective fails the test in minutes, not at CI's 90)
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=300))
    try:
        (out / f'rank{rank}.json').write_text(json.dumps(fn(rank, *args)))
    finally:
        torch.distributed.barrier()  # (gloo aborts a rank whose peer tears down first)
        torch.distributed.destroy_process_group()
    os._exit(0)


def _on_two_ranks(fn, tmp_path, *args):
    """What `fn(rank, *args)` returns on each of two DDP ranks (gloo, CPU), in rank order."""
    import json
    torch.multiprocessing.spawn(_rank_main, args=(fn, args, str(tmp_path / 'init'), tmp_path), nprocs=2)
    return [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in (0, 1)]


def _rank_steps(rank, pkg, lengths, text_bucket=1, hooked=None):
    """One rank of `test_ranks_agree_on_every_step`: training steps of its own text lengths, max_shapes=1; at the
    steps `hooked[rank]` lists, its second layer has a forward hook (a step the stack's graph can't stand for)."""
    lm = _lm(pkg)
    graphs = layer_graphs.install(lm, max_shapes=1, capture=RecordingCapture(), device_type='cpu', distributed=True,
                                  text_bucket=text_bucket)
    codes = torch.randint(0, 256, (1, 4, 30), generator=torch.Generator().manual_seed(9))
    graphed = []
    for step, length in enumerate(lengths[rank]):
        hook = (lm.transformer.layers[1].register_forward_hook(lambda *a: None)
                if step in (hooked or {}).get(rank, ()) else None)
        _step(lm, codes, length)
        graphed.append(graphs.active is not None)
        if hook is not None:
            hook.remove()
    return {'graphed': graphed, 'stats': graphs.stats}


def test_ranks_agree_on_every_step(debug_lm_pkg, tmp_path):
    """With DDP the adapter gradients are all-reduced one by one as they arrive, so every rank must produce them in
    the same order: a step is graphed on all ranks or on none (rank 0 meets a second text length beyond
    graph_shapes=1 while rank 1 could replay, and the other way round)."""
    ranks = _on_two_ranks(_rank_steps, tmp_path, debug_lm_pkg, {0: [2, 5, 2, 7], 1: [2, 2, 5, 2]})
    assert ranks[0]['graphed'] == ranks[1]['graphed'] == [True, False, False, False]
    layers = 2
    for rank in ranks:
        assert rank['stats']['graphed_calls'] == layers and rank['stats']['eager_calls'] == 3 * layers


def test_ranks_agree_on_a_step_the_stack_cant_stand_for_on_one_rank(debug_lm_pkg, tmp_path):
    """A forward hook on one rank's layer at step 1: that rank runs the step as without the graphs, and tells the
    others, which run it eagerly too (else they would wait in the agreement, or all-reduce in another order)."""
    ranks = _on_two_ranks(_rank_steps, tmp_path, debug_lm_pkg, {0: [2, 2, 2], 1: [2, 2, 2]}, 1, {0: [1]})
    assert ranks[0]['graphed'] == ranks[1]['graphed'] == [True, False, True]
    assert ranks[1]['stats']['eager_calls'] == 2 and ranks[0]['stats']['eager_calls'] == 0


@pytest.mark.parametrize('plan', ['none', 'selective', 'torch'])
def test_solver_steps_through_the_graphs_equal_eager_ones(dora_dir, plan):
    """The solver's own steps (AudioCraft's run_step: conditioners, CFG, cross-entropy, clipping, AdamW, zero_grad,
    the non-finite guard), LoRA dropout 0.1, with the layers dispatched through the graphs (torch's capture stood in
    for, as above): the same cross-entropies, step for step; with selective or whole-layer checkpointing recomputed
    inside them, masks kept, too."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'benchmarks'))
    from cuda_checks import fit_one_batch
    overrides = ['device=cpu', 'autocast=false', 'lora.dropout=0.1', f'lora.activation_checkpointing={plan}']
    installed = []

    def graphed(solver):
        installed.append(layer_graphs.install(solver.model, capture=RecordingCapture(), device_type='cpu'))

    def seeded(**kwargs):  # (the LoRA init, the batch and the dropout masks)
        import random
        import numpy as np
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        return fit_one_batch(overrides, steps=5, **kwargs)
    eager = seeded()
    through_graphs = seeded(prepare=graphed)
    assert through_graphs == eager
    assert installed[0].stats['graphed_calls'] == 5 * len(installed[0].layers)
    assert set(installed[0].capture_contexts) == ({plan} - {'none'})


def _rank_plan(rank, pkg):
    """One rank of `test_ranks_install_the_graphs_together`: rank 0's budget holds 3 signatures, rank 1's 1."""
    lm = _lm(pkg)
    shared, per_shape, fallback = memory_plan.graph_static_bytes(_solver(lm), step_bytes=0)
    needed = 2 ** 30
    room = {0: 3, 1: 1}[rank]
    shapes = memory_plan.plan_graphs(_solver(lm, budget=needed + shared + fallback + room * per_shape, needed=needed))
    graphs = layer_graphs.installed(lm)
    return {'shapes': shapes, 'max_shapes': graphs and graphs.max_shapes, 'agrees': graphs and graphs.agree is not None,
            'strict': graphs and graphs.strict}


def test_ranks_install_the_graphs_together(debug_lm_pkg, tmp_path):
    """Each rank plans with its own free memory; with DDP they must all hold the graphs (they agree on every step
    with a collective), with the same number of signatures: the fewest any rank can hold."""
    plans = _on_two_ranks(_rank_plan, tmp_path, debug_lm_pkg)
    assert plans[0] == plans[1] == {'shapes': 1, 'max_shapes': 1, 'agrees': True, 'strict': True}


def test_a_failed_capture_that_leaves_the_generator_broken_stops_training(debug_lm_pkg, monkeypatch):
    """A capture that fails midway can leave CUDA's generator in capture mode, where every later eager dropout fails:
    under auto that must stop with the fix (lora.graph_layers=false), not continue into a crash."""
    assert layer_graphs._random_numbers_work(torch.device('cpu'))
    monkeypatch.setattr(layer_graphs, '_random_numbers_work', lambda device: False)
    lm = _lm(debug_lm_pkg, dropout=0.1)
    layer_graphs.install(lm, capture=_failing_capture, device_type='cpu')
    codes = torch.randint(0, 256, (2, 4, 30), generator=torch.Generator().manual_seed(10))
    with pytest.raises(RuntimeError, match='Rerun with lora.graph_layers=false'):
        _step(lm, codes, 2)


def _rank_capture_fails(rank, pkg):
    """One rank of `test_a_capture_failing_on_one_rank_stops_every_rank`: rank 1's capture fails."""
    lm = _lm(pkg)
    layer_graphs.install(lm, capture=RecordingCapture() if rank == 0 else _failing_capture, device_type='cpu',
                         distributed=True)
    codes = torch.randint(0, 256, (1, 4, 30), generator=torch.Generator().manual_seed(11))
    try:
        _step(lm, codes, 2)
        return 'trained'
    except RuntimeError as error:
        return str(error)


def test_a_capture_failing_on_one_rank_stops_every_rank(debug_lm_pkg, tmp_path):
    """The rank whose capture failed tells the others before it stops: they stop with it, not wait in their next
    collective until the timeout."""
    outcomes = _on_two_ranks(_rank_capture_fails, tmp_path, debug_lm_pkg)
    assert 'failed on another rank' in outcomes[0] and 'lora.graph_layers=false' in outcomes[0]
    assert 'not permitted' in outcomes[1] and 'lora.graph_layers=false' in outcomes[1]
