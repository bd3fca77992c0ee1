"""Layer norms that hand their readers the autocast dtype, with the residual add in front of them, in one kernel
(`lora.fused_norms`, on by default).

Under autocast AudioCraft's layer norms run in float32 (the residual stream's dtype; CUDA autocast also lists
`layer_norm` as a float32 op) and every reader casts their output to bf16 at once: the q/k/v projections of self- and
cross-attention and `linear1` start with that cast. So each norm pays, in forward, a float32 write of its output, a
float32 read and a bf16 write (the cast), and in backward the same the other way (the bf16 gradient widened before
the norm's backward reads it): 16 bytes an element more than needed. The residual adds in front of `norm_cross` and
`norm2` (`x = x + branch`) write the stream that the norm reads again at once; in backward autograd sums the stream's
two gradients (the norm's and the residual's) in a kernel of its own, and casts the sum to bf16 for the branch in
another. At musicgen-small, batch 16 x 30 s, that is ~0.39 GB a norm and step and as much again for each add, ~47
GB a step: in `benchmarks/gpu_model.py`'s H100 model 18 of the LoRA step's 150 GPU ms (0.70x -> 0.62x of AudioCraft's
full fine-tune; medium b16 497 -> 441 ms, 0.75x -> 0.66x), elementwise work that a full fine-tune shares, so it
weighs on the LoRA/full ratio. Measured on an H100 (session 18, `step_time.py`'s `lora_graphed_unfused`): the graphed
small-b16 step 0.174 -> 0.150 s (-14%).

Here `layer_norm_to` (norm1) and `add_layer_norm_to` (the add and norm_cross / norm2) compute the norm in float32
and write the autocast dtype directly; their backward reads the bf16 gradient, adds the stream's gradient and writes
both the stream's float32 gradient and the branch's bf16 one. One kernel each way per norm (Triton on CUDA:
norm_kernels.py). The values are those of the layer as AudioCraft runs it, the float32 norm rounded to bf16 once as
its reader did: on CUDA up to float32 rounding (the kernel reduces in another order than ATen's and may fuse a
multiply-add; bf16 outputs then 1 ulp apart where that flips a rounding), elsewhere bit for bit, as the ops run
ATen's kernels there (tests/test_fused_norms.py). AudioCraft's code runs instead for a norm with trainable weights,
without autocast, on a non-float32 stream, without gradient (validation, generation), and in a layer whose linear1
falls back to peft's own forward (a merged or disabled adapter, several adapters, a variant: peft reads norm2's output
twice, its LoRA branch in float32). A norm with forward hooks of its own is called as a module, its add apart (the
fused add doesn't call the module); backward and global module hooks of norm_cross and norm2 are not run.

`install` swaps classes (names, state dict and deepcopy unchanged; `remove` swaps back): the norms of AudioCraft's
pre-norm transformer layers become `FusedLayerNorm` (still `nn.LayerNorm`s) and the layers `FusedResidualLayer`
(still `StreamingTransformerLayer`s, whose `forward` is AudioCraft's with `x = x + branch; norm(x)` as one op; its
blocks, LayerScale, attention, feed-forward and streaming state are AudioCraft's). Not post-norm layers (their norms
write the stream itself) nor the LM's `out_norm`: four output heads read it, and the gradients they hand back would
be summed in bf16, not float32. The Triton kernels are checked against ATen once per device and width
(`norm_kernels.triton_ok`; the solver runs `check_kernels` once the LM is on its GPU); where they fail the ops run
ATen's kernels there, with a warning. As custom ops they are one op each to selective activation checkpointing
(recomputed in backward like any norm), to the memory estimate's fake tensors, and to torch.compile (which fuses
norms itself: `lora.compile` keeps AudioCraft's). They hand the attentions bf16 whatever
`lora.attention_in_autocast_dtype` says (the same values: that setting's float32 round trip changes none).

Across layers (`run_chain`, session 15): where the layers' CUDA graphs run the whole stack as one callable with no
checkpointing (layer_graphs), each layer's closing residual add runs with the next layer's norm1 as
`add_layer_norm_to` too, a layer boundary an eager step (one module call a layer) can't fuse across: the add's pass
over the stream and, in backward, the separate sum of the layer input's two gradients are gone. The same values (the
same kernel reduces h = x + branch as it reduces x alone; the stream gradient added in float32 either way, the
backward kernel built without multiply-add contraction so that it rounds as autograd's separate add does). The
chained norm1 is not called as a module: its backward and global module hooks don't run (forward hooks of its own
make `add_and_norm` call it as one).
"""
import contextlib
import threading
import typing as tp

from peft.tuners.lora import LoraLayer
import torch
from torch import nn

from audiocraft.modules.transformer import StreamingTransformerLayer

from . import recompute
from .attention_dtype import _in_autocast_dtype
from .fast_lora import FastLoraLinear
from .norm_kernels import MAX_WIDTH, aten_backward, aten_forward, triton_backward, triton_forward, triton_ok

__all__ = ['FusedLayerNorm', 'FusedResidualLayer', 'install', 'remove', 'check_kernels', 'layer_norm_to',
           'add_layer_norm_to']

Tensor = torch.Tensor


def _triton(x: Tensor) -> bool:
    return x.shape[-1] <= MAX_WIDTH and triton_ok(x.device, x.shape[-1])


# ------------------------------------------------------------------------------------------ layer_norm_to (norm1)
@torch.library.custom_op('audiocraft_lora::layer_norm_to', mutates_args=())
def layer_norm_to(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                  dtype: torch.dtype) -> tp.Tuple[Tensor, Tensor, Tensor]:
    """`layer_norm(x.float(), weight, bias).to(dtype)` over the last dimension, with the float32 mean and 1/std of
    each row ([..., 1]) for the backward. This body runs on every device but CUDA: ATen's kernels, as eager."""
    return aten_forward(x, None, weight, bias, eps, dtype)[1:]


@layer_norm_to.register_kernel('cuda')
def _layer_norm_to_cuda(x, weight, bias, eps, dtype):
    return (triton_forward if _triton(x) else aten_forward)(x, None, weight, bias, eps, dtype)[1:]


@layer_norm_to.register_fake
def _layer_norm_to_fake(x, weight, bias, eps, dtype):
    return x.new_empty(x.shape, dtype=dtype), *_stats(x)


def _stats(x: Tensor) -> tp.Tuple[Tensor, Tensor]:
    shape = (*x.shape[:-1], 1)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op('audiocraft_lora::layer_norm_to_backward', mutates_args=())
def layer_norm_to_backward(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """The input gradient of `layer_norm_to` (in x's dtype) from its output's gradient (any float dtype)."""
    return aten_backward(grad, x, weight, mean, rstd)[0]


@layer_norm_to_backward.register_kernel('cuda')
def _layer_norm_to_backward_cuda(grad, x, weight, mean, rstd):
    return (triton_backward if _triton(x) else aten_backward)(grad, x, weight, mean, rstd)[0]


@layer_norm_to_backward.register_fake
def _layer_norm_to_backward_fake(grad, x, weight, mean, rstd):
    return x.new_empty(x.shape)


def _norm_setup(ctx, inputs, output):
    x, weight = inputs[:2]
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)


def _norm_backward(ctx, grad, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x = layer_norm_to_backward(grad, x, weight, mean, rstd) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None  # (weight and bias frozen: FusedLayerNorm checks)


layer_norm_to.register_autograd(_norm_backward, setup_context=_norm_setup)


# ------------------------------------------------------------- add_layer_norm_to (x + branch; norm_cross, norm2)
@torch.library.custom_op('audiocraft_lora::add_layer_norm_to', mutates_args=())
def add_layer_norm_to(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, eps: float,
                      dtype: torch.dtype) -> tp.Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`h = x + y` (the residual add) and `layer_norm(h.float(), weight, bias).to(dtype)`: (h, out, mean, rstd)."""
    return aten_forward(x, y, weight, bias, eps, dtype)


@add_layer_norm_to.register_kernel('cuda')
def _add_layer_norm_to_cuda(x, y, weight, bias, eps, dtype):
    return (triton_forward if _triton(x) else aten_forward)(x, y, weight, bias, eps, dtype)


@add_layer_norm_to.register_fake
def _add_layer_norm_to_fake(x, y, weight, bias, eps, dtype):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype)), x.new_empty(x.shape, dtype=dtype), \
        *_stats(x)


@torch.library.custom_op('audiocraft_lora::add_layer_norm_to_backward', mutates_args=())
def add_layer_norm_to_backward(grad: Tensor, grad_h: tp.Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                               rstd: Tensor, y_dtype: torch.dtype) -> tp.Tuple[Tensor, Tensor]:
    """(dx, dy) of `add_layer_norm_to`: the norm's input gradient plus h's own (`grad_h`), and that in y's dtype."""
    return aten_backward(grad, h, weight, mean, rstd, grad_h, y_dtype)


@add_layer_norm_to_backward.register_kernel('cuda')
def _add_layer_norm_to_backward_cuda(grad, grad_h, h, weight, mean, rstd, y_dtype):
    return (triton_backward if _triton(h) else aten_backward)(grad, h, weight, mean, rstd, grad_h, y_dtype)


@add_layer_norm_to_backward.register_fake
def _add_layer_norm_to_backward_fake(grad, grad_h, h, weight, mean, rstd, y_dtype):
    return h.new_empty(h.shape), h.new_empty(h.shape, dtype=y_dtype)


def _add_norm_setup(ctx, inputs, output):
    h, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.y_dtype = inputs[1].dtype
    ctx.save_for_backward(h, inputs[2], mean, rstd)


def _add_norm_backward(ctx, grad_h, grad, grad_mean, grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors  # (an unused output's gradient comes in as zeros, not None)
    grad_x, grad_y = add_layer_norm_to_backward(grad, grad_h, h, weight, mean, rstd, ctx.y_dtype)
    need_x, need_y = ctx.needs_input_grad[:2]  # (the first layer's stream, the embeddings' sum, needs none)
    return grad_x if need_x else None, grad_y if need_y else None, None, None, None, None


add_layer_norm_to.register_autograd(_add_norm_backward, setup_context=_add_norm_setup)


# ---------------------------------------------------------------------------------------------- the modules
class _Unfused(threading.local):
    depth = 0


_UNFUSED = _Unfused()


@contextlib.contextmanager
def _unfused():
    """Within it, FusedLayerNorm runs nn.LayerNorm's forward: what FusedResidualLayer runs its forward in where a norm
    output would have two readers. (Only around a forward that checkpointing recomputes with it: wrapped around a
    checkpointed call from outside, the recompute would run without it and torch would find other saved tensors.)"""
    _UNFUSED.depth += 1
    try:
        yield
    finally:
        _UNFUSED.depth -= 1


class FusedLayerNorm(nn.LayerNorm):
    """An `nn.LayerNorm` that, in training steps under autocast, returns its float32 input's norm in the autocast
    dtype from one op (`layer_norm_to`); anything else is nn.LayerNorm's forward: no autocast, trainable weights, a
    bf16 input, and no gradient (validation and generation: a custom op's Python dispatch costs ~10 us more than
    ATen's three ops, which a token-by-token generation, bound by the host, would feel), or inside `_unfused()`."""

    def fused_dtype(self, x: Tensor) -> tp.Optional[torch.dtype]:
        """The dtype the fused op writes for `x`, or None where nn.LayerNorm's forward runs."""
        device_type = x.device.type
        if (x.dtype != torch.float32 or not torch.is_grad_enabled() or not torch.is_autocast_enabled(device_type)
                or _UNFUSED.depth or self.weight is None
                or self.bias is None or self.weight.requires_grad or self.bias.requires_grad
                or len(self.normalized_shape) != 1):
            return None
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.fused_dtype(x)
        if dtype is None:
            return super().forward(x)
        return layer_norm_to(x, self.weight, self.bias, float(self.eps), dtype)[0]

    def add_and_norm(self, x: Tensor, y: Tensor) -> tp.Tuple[Tensor, Tensor]:
        """`h = x + y` and `self(h)`, from one op where it applies. Where the norm has forward (pre-)hooks of its own
        (but attention_dtype's, a cast the op makes anyway) the add runs apart and the norm as a module, so that they
        run (and see its output in the autocast dtype). Backward hooks and global module hooks are not run."""
        dtype = self.fused_dtype(x)
        if (dtype is None or y.shape != x.shape or not y.is_floating_point() or y.device != x.device
                or self._forward_pre_hooks or any(hook is not _in_autocast_dtype
                                                  for hook in self._forward_hooks.values())):
            h = x + y
            return h, self(h)
        h, out, _, _ = add_layer_norm_to(x, y, self.weight, self.bias, float(self.eps), dtype)
        return h, out


class FusedResidualLayer(StreamingTransformerLayer):
    """AudioCraft's pre-norm transformer layer with each residual add that a norm reads at once (in front of
    norm_cross and norm2) and that norm as one op (`FusedLayerNorm.add_and_norm`). Norms not swapped run AudioCraft's
    forward (post-norm layers are never swapped: `install`)."""

    def forward(self, src: Tensor, src_mask: tp.Optional[Tensor] = None,  # type: ignore
                src_key_padding_mask: tp.Optional[Tensor] = None, cross_attention_src: tp.Optional[Tensor] = None):
        if not _one_reader(self.linear1):  # peft's own forward reads norm2's output twice: AudioCraft's norms
            with _unfused():
                return super().forward(src, src_mask, src_key_padding_mask, cross_attention_src)
        if not self._fused_norms(cross_attention_src is not None):
            return super().forward(src, src_mask, src_key_padding_mask, cross_attention_src)
        return self.chained(src, None, cross_attention_src, None, src_mask, src_key_padding_mask)[0]

    def fusable(self, cross: bool) -> bool:
        """Whether `forward` (with or without cross-attention) runs the fused adds and norms."""
        return _one_reader(self.linear1) and self._fused_norms(cross)

    def _fused_norms(self, cross: bool) -> bool:
        return (self.norm_first and cross == (self.cross_attention is not None) and type(self.norm2) is FusedLayerNorm
                and (not cross or type(self.norm_cross) is FusedLayerNorm))

    def chained(self, x: Tensor, normed: tp.Optional[Tensor], cross_attention_src: tp.Optional[Tensor],
                next_norm: tp.Optional['FusedLayerNorm'], src_mask: tp.Optional[Tensor] = None,
                src_key_padding_mask: tp.Optional[Tensor] = None) -> tp.Tuple[Tensor, tp.Optional[Tensor]]:
        """The fused forward on stream `x`, from `normed`, its norm1 output, where the layer before made it (None:
        made here); with `next_norm`, the next layer's norm1, the closing residual add and that norm run as one op
        too. Returns (the stream, `next_norm`'s output or None). (`fusable` layers only.)"""
        if normed is None:
            normed = self.norm1(x)
        branch = self.layer_scale_1(self._sa_block(normed, src_mask, src_key_padding_mask))
        if cross_attention_src is not None:
            x, normed = self.norm_cross.add_and_norm(x, branch)
            branch = self.layer_scale_cross(self._cross_attention_block(normed, cross_attention_src))
        x, normed = self.norm2.add_and_norm(x, branch)
        if next_norm is not None:  # (a selective layer in the graphed stack: the closing op beside its FF tail)
            closed = recompute.closing_tail(self, normed, lambda b: next_norm.add_and_norm(x, self.layer_scale_2(b)))
            if closed is not None:
                return closed
        branch = self.layer_scale_2(self._ff_block(normed))
        if next_norm is None:
            return x + branch, None
        return next_norm.add_and_norm(x, branch)


def chainable(layers: tp.Sequence[nn.Module], cross: bool) -> bool:
    """Whether `run_chain` can run `layers` (a whole stack, one after the other, no hooks: the layers' CUDA graphs):
    every one a fusable FusedResidualLayer, each but the first with a FusedLayerNorm norm1."""
    return bool(layers) and all(type(layer) is FusedResidualLayer and layer.fusable(cross) for layer in layers) and all(
        type(layer.norm1) is FusedLayerNorm for layer in layers[1:])


def run_chain(layers: tp.Sequence[nn.Module], x: Tensor, cross_attention_src: tp.Optional[Tensor]) -> Tensor:
    """`layers` one after the other on stream `x` (`chainable` ones), each layer's closing residual add run with the
    next layer's norm1 as one op (`FusedLayerNorm.add_and_norm`): where it applies, the add's own pass over the
    stream and, in backward, the sum of the stream's two gradients are gone. Values as each layer's forward."""
    normed = None
    for index, layer in enumerate(layers):
        next_norm = layers[index + 1].norm1 if index + 1 < len(layers) else None
        x, normed = layer.chained(x, normed, cross_attention_src, next_norm)
    return x


def _one_reader(linear: nn.Module) -> bool:
    """Whether `linear` reads its input once, cast to the compute dtype: a plain projection, or our fast LoRA path.
    peft's own forward (what FastLoraLinear falls back to with a merged or disabled adapter, several adapters or a
    variant) reads it twice, the LoRA branch in float32: there the gradients would be summed in bf16 and the dropout
    round twice."""
    if not isinstance(linear, LoraLayer):
        return True
    return isinstance(linear, FastLoraLinear) and linear._fast_adapter({}) is not None


def _layers(model: nn.Module) -> tp.List[nn.Module]:
    """AudioCraft's pre-norm layers (MusicGen's): there each norm has one reader. A post-norm layer's norms write the
    residual stream itself, read by the next layer and its residual add: they stay float32."""
    return [m for m in model.modules()
            if type(m) in (StreamingTransformerLayer, FusedResidualLayer) and getattr(m, 'norm_first', False)]


def _norms(layer: nn.Module) -> tp.Iterator[nn.Module]:
    for name in ('norm1', 'norm_cross', 'norm2'):
        norm = getattr(layer, name, None)
        if type(norm) in (nn.LayerNorm, FusedLayerNorm):
            yield norm


def check_kernels(model: nn.Module) -> tp.Dict[str, bool]:
    """Check the Triton kernels once for each (CUDA device, width) of the model's swapped norms, before training
    (the solver, once the LM is on its device): not at a first use inside a CUDA graph's warmup. Returns
    {'cuda:0/1024': usable, ...}."""
    checked = {}
    for layer in _layers(model):
        for norm in _norms(layer):
            if type(norm) is FusedLayerNorm and norm.weight is not None and norm.weight.is_cuda:
                width = int(norm.normalized_shape[0])
                if width <= MAX_WIDTH:
                    checked[f'{norm.weight.device}/{width}'] = triton_ok(norm.weight.device, width)
    return checked


def install(model: nn.Module) -> int:
    """Swap the layers of AudioCraft's transformer to `FusedResidualLayer` and their norms (norm1, norm_cross,
    norm2) to `FusedLayerNorm` (idempotent); returns how many norms are swapped."""
    count = 0
    for layer in _layers(model):
        layer.__class__ = FusedResidualLayer
        for norm in _norms(layer):
            norm.__class__ = FusedLayerNorm
            count += 1
    return count


def remove(model: nn.Module) -> int:
    """Undo `install`; returns how many norms were swapped back."""
    count = 0
    for layer in _layers(model):
        layer.__class__ = StreamingTransformerLayer
        for norm in _norms(layer):
            count += type(norm) is FusedLayerNorm
            norm.__class__ = nn.LayerNorm
    return count
