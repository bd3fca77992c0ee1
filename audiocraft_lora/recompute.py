"""Activation checkpointing of AudioCraft's transformer layers: which layers recompute what in backward.

`torch` recomputes a whole layer (AudioCraft's own `transformer_lm.checkpointing`, non-reentrant so frozen inputs
still give adapter gradients). `selective` runs a layer under torch's selective checkpointing with a policy that keeps
the outputs of large matmuls (contraction > the LoRA rank) and of attention kernels and recomputes layer norms, GELU,
copies and the rank-r LoRA updates. A plan may mix them: `mode` on `fraction` of the layers (evenly spaced), `rest`
(`none` or `selective`) on the others. The plan of each layer is an attribute of the layer, so a deepcopy keeps it.

Under `selective`, without LoRA dropout or with dropout_kernels' (`_tail_fits`), the feed-forward block's tail,
`linear2(gelu(h))`, runs outside the layer's checkpoint (`ff_block`): torch's checkpoint recomputes a layer's forward
up to the last tensor it saved, so with linear2 inside, its output (never read in backward) had to be kept too or its
GEMM run again. The tail saves what it needs itself and the GELU's output as the recipe to make it again from `h`
(kept anyway), and the layer's recompute stops at linear1: a `[B, T, d]` tensor per layer less (1.1 GiB at
musicgen-small, batch 16 x 30 s), values unchanged.
"""
import contextlib
import functools
import threading
import typing as tp

from peft.tuners.lora import Linear as LoraLinear
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .errors import LoRAConfigError
from .fast_lora import one_product, undropped


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
        layer.__dict__.pop('_ff_block', None)  # back to the layer's own feed-forward block
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
_MATMULS = {'aten.mm.default': 0, 'aten.addmm.default': 1, 'aten.bmm.default': 0, 'aten.baddbmm.default': 1,
            'audiocraft_lora.dropout_rank_product.default': 0}  # (x A^T with LoRA dropout drawn inside: a matmul)


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
    if _STATE.tail:  # (the feed-forward tail: saved outside the checkpoint, never recomputed: nothing to keep)
        return CheckpointPolicy.PREFER_RECOMPUTE
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
        if layer._lora_checkpointing == 'selective' and hasattr(layer, 'linear2'):
            layer._ff_block = functools.partial(ff_block, layer)  # (an attribute of the layer: deepcopy keeps it)
    transformer._apply_layer = functools.partial(_apply_layer_planned, selective_context(max_cheap_rank))
    return indices


def selective_context(max_cheap_rank: int, save_random: bool = False) -> tp.Callable:
    """The `context_fn` of torch's checkpoint that runs `selective`'s policy (`save_random`: see _selective_policy),
    marking its forward and recompute as a selective region (what `ff_block` runs its tail outside of)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    policy = functools.partial(_selective_policy, max_cheap_rank, save_random=save_random)

    def contexts():
        forward, recompute = create_selective_checkpoint_contexts(policy)
        if torch.compiler.is_compiling():  # (torch.compile takes dispatch modes only; ff_block stays plain there)
            return forward, recompute
        return _Region(forward, save_random), _Region(recompute, save_random)
    return contexts


class _State(threading.local):
    region: tp.Optional[bool] = None  # inside a selective checkpoint region: whether it keeps random draws
    tail: bool = False                # inside the feed-forward tail `ff_block` runs outside the checkpoint


_STATE = _State()


class _Region:
    """`inner` (a selective checkpoint context) entered with `_STATE.region` set."""

    def __init__(self, inner, save_random: bool):
        self.inner, self.save_random, self.outer = inner, save_random, None

    def __enter__(self):
        entered = self.inner.__enter__()
        self.outer, _STATE.region = _STATE.region, self.save_random
        return entered

    def __exit__(self, *exc):
        _STATE.region = self.outer
        return self.inner.__exit__(*exc)


def ff_block(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AudioCraft's feed-forward block, `dropout2(linear2(dropout(activation(linear1(x)))))`, of a layer on
    `selective`; inside its checkpoint region the tail after linear1 runs outside the checkpoint (`_outside`), so the
    layer's recompute stops at linear1 and linear2's output is neither kept nor computed again. Elsewhere (eval,
    whole-layer checkpointing of the captures' warmup, a tail that would keep more than the recompute) as AudioCraft
    runs it."""
    out = closing_tail(layer, x)
    return type(layer)._ff_block(layer, x) if out is None else out


def closing_tail(layer: nn.Module, x: torch.Tensor, close: tp.Optional[tp.Callable] = None) -> tp.Any:
    """`close(feed-forward block of x)` (None: the block's output) with the tail, and `close`, outside the selective
    region's checkpoint (`_outside`), where `_tail_fits`; else None. `close`: what ends the layer after the block
    (the chained stack's residual add and the next layer's norm1, `FusedResidualLayer.chained`), which then saves
    nothing into the checkpoint either, so its recompute still stops at linear1."""
    if torch.compiler.is_compiling() or _STATE.region is None or _STATE.tail or not _tail_fits(layer, x):
        return None
    h = layer.linear1(x)
    block = lambda g: layer.dropout2(layer.linear2(layer.dropout(g)))  # noqa: E731
    return _outside(h, block if close is None else lambda g: close(block(g)))


def _tail_fits(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether running `layer`'s feed-forward tail on `x` outside the checkpoint keeps nothing the region would have
    recomputed:
    - a pre-norm layer (a post-norm one saves the tail's output in norm2, and the recompute would run it again),
      GELU (saves its input, which the region keeps: ReLU would save its output), no dropout or LayerScale around it;
    - linear1's output one GEMM's output, which the region keeps anyway (the merged weight's product without LoRA
      dropout, `[x | u] [W | B]^T` with dropout_kernels'; with torch's dropout the region keeps the base product and
      makes the output again, so holding it would be a tensor more);
    - linear2 on the fast LoRA path without LoRA dropout or with dropout_kernels': it saves the GELU output itself,
      which the tail keeps as a recipe (peft's own forward saves a reshape of it, a frozen projection under autocast
      the cast weight, torch's dropout its output and mask: kept where the region makes them again)."""
    if not (layer.training and getattr(layer, 'norm_first', False) and layer.activation is F.gelu):
        return False
    if not isinstance(layer.layer_scale_2, nn.Identity):  # (it saves the tail's output: the recompute reruns it)
        return False
    if any(float(getattr(layer, name).p) > 0 for name in ('dropout', 'dropout2')):
        return False
    first = layer.linear1
    return (one_product(first, x) if isinstance(first, LoraLinear) else True) and undropped(layer.linear2, x)


class _Remade:
    """A saved tensor kept as how to make it again (`make()`), not as memory."""

    def __init__(self, make: tp.Callable[[], torch.Tensor]):
        self.make = make


@contextlib.contextmanager
def _saved_as(key: tp.Callable[[], tp.Optional[tuple]], make: tp.Callable[[], torch.Tensor]):
    """Saved-tensor hooks: the tensor viewed as `key()` (`_view_key`; None: none yet) is saved as `_Remade(make)`,
    everything else as itself."""
    def pack(t: torch.Tensor):
        wanted = key()
        return _Remade(make) if wanted is not None and _view_key(t) == wanted else t

    def unpack(saved):
        return saved.make() if isinstance(saved, _Remade) else saved
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextlib.contextmanager
def normed_input(norm: nn.Module, h: torch.Tensor, normed: tp.Optional[torch.Tensor]):
    """While inside, a checkpoint taking `normed` = `norm(h)` beside `h` keeps it as how to make it again (the norm
    the region would otherwise recompute itself), not as a tensor: `norm(h)` under the forward's autocast state and
    with grad enabled, so that the norm takes the path it took then."""
    if normed is None:
        yield
        return
    key = _view_key(normed)
    device = h.device.type
    dtype, enabled = torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)

    def make() -> torch.Tensor:
        with torch.enable_grad(), torch.autocast(device, dtype=dtype) if enabled else contextlib.nullcontext():
            return norm(h.detach()).detach()
    with _saved_as(lambda: key, make):
        yield


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _outside(h: torch.Tensor, project: tp.Callable) -> torch.Tensor:
    """`project(gelu(h))` with what autograd saves for it kept here, not by the enclosing checkpoint (so its
    recompute never reaches it), the GELU's output saved as how to make it again from `h` (the GELU that `selective`
    recomputes anyway; elementwise, in h's dtype whatever autocast says) and nothing of it cached by the selective
    policy."""
    made: tp.List[tuple] = []

    def gelu() -> torch.Tensor:
        with torch.no_grad():
            return F.gelu(h)

    outer, _STATE.tail = _STATE.tail, True
    try:
        with _saved_as(lambda: made[0] if made else None, gelu):
            g = F.gelu(h)
            made.append(_view_key(g))
            return project(g)
    finally:
        _STATE.tail = outer


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
