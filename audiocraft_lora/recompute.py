"""Activation checkpointing of AudioCraft's transformer layers: which layers recompute what in backward.

`torch` recomputes a whole layer (AudioCraft's own `transformer_lm.checkpointing`, non-reentrant so frozen inputs
still give adapter gradients). `selective` runs a layer under torch's selective checkpointing with a policy that keeps
the outputs of large matmuls (contraction > the LoRA rank) and of attention kernels and recomputes layer norms, GELU,
copies and the rank-r LoRA updates. A plan may mix them: `mode` on `fraction` of the layers (evenly spaced), `rest`
(`none` or `selective`) on the others. The plan of each layer is an attribute of the layer, so a deepcopy keeps it.
"""
import contextlib
import functools
import typing as tp

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import LoRAConfigError


def set_checkpointing(model: nn.Module, mode: str, fraction: float = 1.0, rest: str = 'none') -> dict:
    """Put the LM's transformer on a checkpointing plan (replacing any earlier one); returns what was set."""
    transformer = getattr(model, 'transformer', None)
    if transformer is None or not hasattr(transformer, 'checkpointing'):
        raise LoRAConfigError("lora.activation_checkpointing needs AudioCraft's StreamingTransformer LM.")
    if '_lora_layer_graphs' in model.__dict__:  # (their hook holds the plan they were installed on)
        raise RuntimeError("Remove the layers' CUDA graphs (layer_graphs.remove) before changing the checkpointing "
                           "plan, and install them again after.")
    transformer.__dict__.pop('_apply_layer', None)  # back to AudioCraft's own hook
    transformer.checkpointing = 'none'
    for layer in transformer.layers:
        layer.__dict__.pop('_lora_checkpointing', None)
    if mode == 'none':
        return {}
    info: tp.Dict[str, tp.Any] = {'activation_checkpointing': mode}
    if mode == 'torch':
        transformer.checkpointing = 'torch'  # AudioCraft's own per-layer checkpointing
    if mode != 'torch' or fraction < 1.0:
        info['checkpointed_layers'] = checkpoint_layers(transformer, mode, fraction, max_lora_rank(model), rest=rest)
        if rest != 'none':
            info['checkpoint_rest'] = rest
    return info


# ops whose outputs selective checkpointing keeps: attention kernels (by name: torch's and xformers' variants)
_ATTENTION_MARKERS = ('attention', 'flash')
_MATMULS = {'aten.mm.default': 0, 'aten.addmm.default': 1, 'aten.bmm.default': 0, 'aten.baddbmm.default': 1}


@functools.lru_cache(maxsize=None)
def _op_kind(op) -> tp.Tuple[str, int]:
    """('matmul', index of the left operand) | ('attention', -1) | ('other', -1); once per op, not per call."""
    name = str(op)
    if name in _MATMULS:
        return 'matmul', _MATMULS[name]
    if any(marker in name for marker in _ATTENTION_MARKERS) and 'backward' not in name:
        return 'attention', -1
    return 'other', -1


def _selective_policy(max_cheap_rank: int, ctx, op, *args, save_random: bool = False, **kwargs):
    """Keep large matmul outputs and attention outputs; recompute the rest (pointwise, norms, copies, and matmuls
    contracting over at most `max_cheap_rank`, i.e. the LoRA up-projections). `save_random`: also keep what random
    ops drew (LoRA dropout's output and mask), so that backward draws nothing (inside a CUDA graph, where the
    generator's state can't be saved and restored around the recompute)."""
    from torch.utils.checkpoint import CheckpointPolicy
    if save_random and draws_random(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    kind, left = _op_kind(op)
    if kind == 'matmul':
        if args[left].shape[-1] > max_cheap_rank:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    if kind == 'attention':
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def max_lora_rank(model: nn.Module) -> int:
    """The largest LoRA rank of `model`'s adapters (0 without any): selective's policy recomputes products that
    contract over at most this many."""
    ranks = [m.weight.shape[0] for name, m in model.named_modules()
             if name.endswith('lora_A.default') and hasattr(m, 'weight')]
    ranks += [p.shape[0] for name, p in model.named_parameters() if name.endswith('in_proj.lora_A.weight')]
    return max(ranks, default=0)


def _apply_layer_planned(selective_context: tp.Callable, layer: nn.Module, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    mode = getattr(layer, '_lora_checkpointing', 'none')  # an attribute of the layer: survives deepcopy
    if mode == 'none':
        return layer(*args, **kwargs)
    if mode == 'torch':
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return checkpoint(layer, *args, use_reentrant=False, context_fn=selective_context, **kwargs)


def checkpoint_layers(transformer: nn.Module, mode: str, fraction: float, max_cheap_rank: int,
                      rest: str = 'none') -> tp.List[int]:
    """Checkpoint `fraction` of AudioCraft's transformer layers (evenly spaced) with `mode` (`torch`: whole layer,
    `selective`), the others with `rest` (`none` or `selective`); returns the indices of the first group. Replaces the
    instance's `_apply_layer` hook (AudioCraft's own applies one method to every layer and only knows whole-layer
    torch checkpointing or xformers-internal policies)."""
    layers = list(transformer.layers)
    count = max(1, round(fraction * len(layers)))
    indices = sorted({int(i * len(layers) / count) for i in range(count)})
    for index, layer in enumerate(layers):
        layer._lora_checkpointing = mode if index in indices else rest
    transformer._apply_layer = functools.partial(_apply_layer_planned, selective_context(max_cheap_rank))
    return indices


def selective_context(max_cheap_rank: int, save_random: bool = False) -> tp.Callable:
    """The `context_fn` of torch's checkpoint that runs `selective`'s policy (`save_random`: see _selective_policy)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    policy = functools.partial(_selective_policy, max_cheap_rank, save_random=save_random)
    return functools.partial(create_selective_checkpoint_contexts, policy)


def draws_random(op, args: tuple, kwargs: dict) -> bool:
    """Whether this call of `op` draws random numbers: ops tagged so (dropout, random fills) do, except the attention
    kernels (all tagged, for their `dropout_p`) called with `dropout_p=0`, as MusicGen trains."""
    if torch.Tag.nondeterministic_seeded not in getattr(op, 'tags', ()):
        return False
    names = [argument.name for argument in op._schema.arguments]
    if 'dropout_p' not in names:
        return True
    position = names.index('dropout_p')
    dropout = args[position] if position < len(args) else kwargs.get('dropout_p', 0.0)
    return float(dropout) > 0


def _random_kept_policy(ctx, op, *args, **kwargs):
    """Recompute everything but what random ops drew (whole-layer checkpointing inside a CUDA graph)."""
    from torch.utils.checkpoint import CheckpointPolicy
    if draws_random(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _capture_context(plan: str, max_cheap_rank: int) -> tp.Callable:
    """The `context_fn` of torch's checkpoint for a layer on `plan` ('selective' or 'torch') inside a CUDA graph
    capture, where the generator's state can't be saved and restored around the recompute: what random ops drew
    (LoRA dropout's output and mask) is kept, so backward draws nothing; the rest as the plan recomputes it."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    if plan == 'selective':
        return selective_context(max_cheap_rank, save_random=True)
    if plan == 'torch':
        return functools.partial(create_selective_checkpoint_contexts, _random_kept_policy)
    raise ValueError(f"no checkpointing context for plan {plan!r}")


def layer_plan(layer: nn.Module, transformer: tp.Optional[nn.Module] = None) -> str:
    """What `layer` recomputes in backward: 'none', 'selective' or 'torch' (set by `checkpoint_layers`, or for every
    layer by AudioCraft's own `transformer.checkpointing`: whole layers, its xformers policies counted as such)."""
    plan = getattr(layer, '_lora_checkpointing', None)
    if plan is None:
        plan = 'none' if getattr(transformer, 'checkpointing', 'none') == 'none' else 'torch'
    return plan


def capture_contexts(model: nn.Module) -> tp.Dict[str, tp.Callable]:
    """{plan: its `_capture_context`} for the plans AudioCraft LM `model`'s layers are on ('none' left out)."""
    transformer = model.transformer
    plans = {layer_plan(layer, transformer) for layer in transformer.layers} - {'none'}
    rank = max_lora_rank(model)
    return {plan: _capture_context(plan, rank) for plan in plans}


def run_as_captured(context: tp.Optional[tp.Callable], fn: tp.Callable, *args, **kwargs):
    """`fn(*args, **kwargs)` as a layer on a checkpointing plan runs inside a CUDA graph capture (`context`: from
    `capture_contexts`; None: not checkpointed): torch's checkpoint restoring no generator state."""
    if context is None:
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context, **kwargs)


@contextlib.contextmanager
def captured_plan(model: nn.Module):
    """While inside, AudioCraft LM `model`'s layers run their checkpointing plan as the layers' CUDA graphs run it
    (`run_as_captured`: what random ops drew kept for backward, not drawn again): what `memory_plan.plan_graphs`
    estimates a graphed step's memory with when the plan recomputes."""
    transformer = model.transformer
    contexts = capture_contexts(model)
    replaced = transformer.__dict__.get('_apply_layer')

    def apply_layer(layer, *args, **kwargs):
        return run_as_captured(contexts.get(layer_plan(layer, transformer)), layer, *args, **kwargs)
    transformer._apply_layer = apply_layer
    try:
        yield
    finally:
        transformer.__dict__.pop('_apply_layer', None)
        if replaced is not None:
            transformer._apply_layer = replaced
