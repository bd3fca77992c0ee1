"""Layer norms that hand their readers the autocast dtype from one kernel (`lora.fused_norms`, on by default).

Under autocast AudioCraft's layer norms run in float32 (the residual stream's dtype; CUDA autocast also lists
`layer_norm` as a float32 op) and every reader casts their output to bf16 at once: the q/k/v projections of self- and
cross-attention and `linear1` start with that cast. So each norm of each layer pays, in forward, a float32 write of
its output, a float32 read and a bf16 write (the cast), and in backward the same again the other way (the bf16
gradient widened to float32 before the norm's backward reads it): 16 bytes an element more than needed, ~0.39 GB a
norm and step at musicgen-small, batch 16 x 30 s, ~28 GB over its 72 norms. In `benchmarks/gpu_model.py`'s H100 model
that is 11 of the LoRA step's 150 GPU ms (medium b16: 34 of 497), elementwise work a full fine-tune shares, so it
weighs on the LoRA/full ratio (modelled 0.70x -> 0.65x at small b16).

Here `layer_norm_to` computes the norm in float32 and writes the autocast dtype directly, and its backward reads the
bf16 gradient and writes the float32 input gradient, one kernel each way (Triton on CUDA). The values are the float32
norm's, rounded to bf16 once, as the readers' own cast did; on CUDA the kernel sums in another order than ATen's
(float32 results within ~1e-6, bf16 outputs 1 ulp apart where that flips a rounding), on other devices the op is
ATen's `native_layer_norm` and its backward, so a CPU step stays bit for bit (tests/test_fused_norms.py). Training a
norm's own weights (trainable weight or bias), no autocast, or an input that isn't float32 keep AudioCraft's norm.

The swap is a class swap (`FusedLayerNorm`, still an `nn.LayerNorm`: names, state dict and deepcopy unchanged) of the
norms of AudioCraft's transformer layers, each read by one projection (not the LM's `out_norm`, which four output
heads read: the gradients they hand back would be summed in bf16, not float32); `remove` swaps back. Before a
device's first use the Triton kernels are checked against ATen on a small tensor (`triton_ok`); where they fail (no
Triton, another GPU) the op runs ATen's kernels there, with a warning: the same values, no speed-up. As a custom op
it is one op to selective activation checkpointing (recomputed in backward like any norm), to the memory estimate's
fake tensors, and to torch.compile (which fuses norms itself: `lora.compile` keeps AudioCraft's norms).
"""
import functools
import logging
import typing as tp

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ['FusedLayerNorm', 'install', 'remove', 'layer_norm_to', 'triton_forward', 'triton_backward', 'triton_ok']

_MAX_WIDTH = 16384  # one row per Triton program, held in registers: wider norms keep ATen's kernels


# ---------------------------------------------------------------------------------------------------- the op
@torch.library.custom_op('audiocraft_lora::layer_norm_to', mutates_args=())
def layer_norm_to(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  dtype: torch.dtype) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer_norm(x.float(), weight, bias).to(dtype)` over the last dimension, with the float32 mean and 1/std of
    each row ([..., 1]) for the backward. This body runs on every device but CUDA: ATen's kernel, as eager."""
    return _aten_forward(x, weight, bias, eps, dtype)


@layer_norm_to.register_kernel('cuda')
def _layer_norm_to_cuda(x, weight, bias, eps, dtype):
    if x.shape[-1] <= _MAX_WIDTH and triton_ok(x.device):
        return triton_forward(x, weight, bias, eps, dtype)
    return _aten_forward(x, weight, bias, eps, dtype)


@layer_norm_to.register_fake
def _layer_norm_to_fake(x, weight, bias, eps, dtype):
    stats = (*x.shape[:-1], 1)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op('audiocraft_lora::layer_norm_to_backward', mutates_args=())
def layer_norm_to_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor) -> torch.Tensor:
    """The input gradient of `layer_norm_to` (in x's dtype) from its output's gradient (any float dtype)."""
    return _aten_backward(grad, x, weight, mean, rstd)


@layer_norm_to_backward.register_kernel('cuda')
def _layer_norm_to_backward_cuda(grad, x, weight, mean, rstd):
    if x.shape[-1] <= _MAX_WIDTH and triton_ok(x.device):
        return triton_backward(grad, x, weight, mean, rstd)
    return _aten_backward(grad, x, weight, mean, rstd)


@layer_norm_to_backward.register_fake
def _layer_norm_to_backward_fake(grad, x, weight, mean, rstd):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, grad, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x = layer_norm_to_backward(grad, x, weight, mean, rstd) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None  # (weight and bias frozen: FusedLayerNorm checks)


layer_norm_to.register_autograd(_backward, setup_context=_setup_context)


def _aten_forward(x, weight, bias, eps, dtype):
    out, mean, rstd = torch.native_layer_norm(x.float(), [x.shape[-1]], weight.float(), bias.float(), eps)
    return out.to(dtype), mean, rstd


def _aten_backward(grad, x, weight, mean, rstd):
    grad_x = torch.ops.aten.native_layer_norm_backward(grad.float(), x.float(), [x.shape[-1]], mean, rstd,
                                                       weight.float(), None, [True, False, False])[0]
    return grad_x.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- Triton
@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels (defined at first use: `TRITON_INTERPRET=1` in the environment by then runs them on CPU
    tensors, as the tests do). One program normalizes one row, held in registers."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(X, W, B, Y, MEAN, RSTD, width, eps, BLOCK: tl.constexpr, BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        x = tl.load(X + row * width + cols, mask=inside, other=0.).to(tl.float32)
        mean = tl.sum(x, axis=0) / width
        centered = tl.where(inside, x - mean, 0.)
        rstd = 1. / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
        w = tl.load(W + cols, mask=inside, other=0.).to(tl.float32)
        b = tl.load(B + cols, mask=inside, other=0.).to(tl.float32)
        y = centered * rstd * w + b
        if BF16:  # round to nearest even by hand (Y is the bf16 output viewed as uint16): what `.to(bf16)` does
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(y != y, 0x7FC0, bits)  # NaN stays NaN
            tl.store(Y + row * width + cols, bits.to(tl.uint16), mask=inside)
        else:
            tl.store(Y + row * width + cols, y.to(Y.dtype.element_ty), mask=inside)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def backward_kernel(G, X, W, MEAN, RSTD, DX, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        g = tl.load(G + row * width + cols, mask=inside, other=0.).to(tl.float32)
        x = tl.load(X + row * width + cols, mask=inside, other=0.).to(tl.float32)
        w = tl.load(W + cols, mask=inside, other=0.).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(inside, (x - mean) * rstd, 0.)
        wg = tl.where(inside, w * g, 0.)
        c1 = tl.sum(xhat * wg, axis=0) / width
        c2 = tl.sum(wg, axis=0) / width
        dx = (wg - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * width + cols, dx.to(DX.dtype.element_ty), mask=inside)

    return triton, forward_kernel, backward_kernel


def _launch(width: int) -> dict:
    triton = _kernels()[0]
    block = triton.next_power_of_2(width)
    return {'BLOCK': block, 'num_warps': min(16, max(1, block // 256))}


def triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer_norm_to` by the Triton kernel (CUDA tensors; CPU tensors under `TRITON_INTERPRET=1`)."""
    _, forward_kernel, _ = _kernels()
    x = x.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    mean = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    bf16 = dtype == torch.bfloat16
    if rows:
        forward_kernel[(rows,)](x, weight.contiguous(), bias.contiguous(), out.view(torch.uint16) if bf16 else out,
                                mean, rstd, width, eps, BF16=bf16, **_launch(width))
    return out, mean, rstd


def triton_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> torch.Tensor:
    """`layer_norm_to_backward` by the Triton kernel."""
    _, _, backward_kernel = _kernels()
    x, grad = x.contiguous(), grad.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width
    grad_x = torch.empty_like(x)
    if rows:
        backward_kernel[(rows,)](grad, x, weight.contiguous(), mean, rstd, grad_x, width, **_launch(width))
    return grad_x


_CHECKED: tp.Dict[torch.device, bool] = {}


def triton_ok(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device` and agree with ATen (once per device: a [67, 333] norm, forward in
    bf16 and float32, and backward). Never checked during a CUDA graph capture (a check needs a sync): a first use
    inside one takes ATen's kernels, and the check runs at the next use outside."""
    device = torch.device(device)
    if device in _CHECKED:
        return _CHECKED[device]
    if device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(67, 333, device=device, generator=gen) * 3 + 1
        w = torch.randn(333, device=device, generator=gen)
        b = torch.randn(333, device=device, generator=gen)
        g = torch.randn(67, 333, device=device, generator=gen).to(torch.bfloat16)
        ok = True
        for dtype in (torch.bfloat16, torch.float32):
            out, mean, rstd = triton_forward(x, w, b, 1e-5, dtype)
            ref, ref_mean, ref_rstd = _aten_forward(x, w, b, 1e-5, dtype)
            ok &= bool(torch.allclose(out.float(), ref.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                      atol=1e-2 if dtype != torch.float32 else 1e-5))
            ok &= bool(torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(rstd, ref_rstd, rtol=1e-5))
        ok &= bool(torch.allclose(triton_backward(g, x, w, mean, rstd), _aten_backward(g, x, w, mean, rstd),
                                  rtol=1e-4, atol=1e-5))
        error = None if ok else 'its results differ from ATen\'s'
    except Exception as exc:  # no Triton, an unsupported GPU, a compiler error: ATen's kernels, same values
        ok, error = False, f'{type(exc).__name__}: {exc}'
    if not ok:
        logger.warning("lora.fused_norms: the Triton layer-norm kernel can't be used on %s (%s); the norms run "
                       "ATen's kernels there (the same values, without the speed-up).", device, error)
    _CHECKED[device] = ok
    return ok


# ---------------------------------------------------------------------------------------------------- the modules
class FusedLayerNorm(nn.LayerNorm):
    """An `nn.LayerNorm` that, under autocast, returns its float32 input's norm in the autocast dtype from one kernel
    (`layer_norm_to`); anything else (no autocast, trainable weights, a bf16 input) is nn.LayerNorm's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if (x.dtype != torch.float32 or not torch.is_autocast_enabled(device_type) or self.weight is None
                or self.bias is None or self.weight.requires_grad or self.bias.requires_grad
                or len(self.normalized_shape) != 1):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device_type)
        if dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x)
        return layer_norm_to(x, self.weight, self.bias, float(self.eps), dtype)[0]


def _norms(model: nn.Module) -> tp.Iterator[nn.Module]:
    """The norms of AudioCraft's transformer layers, each read by one projection. Not the LM's `out_norm`: its four
    output heads each read it, and their gradients would be summed in bf16 instead of float32."""
    from audiocraft.modules.transformer import StreamingTransformerLayer
    for layer in model.modules():
        if isinstance(layer, StreamingTransformerLayer):
            for name in ('norm1', 'norm_cross', 'norm2'):
                norm = getattr(layer, name, None)
                if type(norm) in (nn.LayerNorm, FusedLayerNorm):
                    yield norm


def install(model: nn.Module) -> int:
    """Swap the layer norms of AudioCraft's transformer layers (norm1, norm_cross, norm2) to `FusedLayerNorm`
    (idempotent); returns how many norms are swapped."""
    count = 0
    for norm in _norms(model):
        norm.__class__ = FusedLayerNorm
        count += 1
    return count


def remove(model: nn.Module) -> int:
    """Undo `install`; returns how many norms were swapped back."""
    count = 0
    for norm in _norms(model):
        if type(norm) is FusedLayerNorm:
            norm.__class__ = nn.LayerNorm
            count += 1
    return count
