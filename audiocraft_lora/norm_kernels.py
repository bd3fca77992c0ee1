"""The kernels of `fused_norms`: a layer norm over the last dimension, in float32, that writes its output in a lower
dtype, optionally adds the residual branch first; and its backward, optionally adding the residual stream's gradient
and writing the branch's gradient too. Triton on CUDA (`triton_forward`, `triton_backward`), ATen's kernels as the
reference and everywhere else (`aten_forward`, `aten_backward`: exactly what AudioCraft's layer computes in eager).

    forward:  h = x + y (if y);  out = layer_norm(h) in float32, rounded once to `dtype`;  mean, rstd per row
    backward: dx = grad_h (if any) + layer_norm_backward(grad_out);  dy = dx rounded to y's dtype (if y)

One Triton program normalizes one row held in registers (rows of up to `MAX_WIDTH`). The bf16 rounding is written
out (round to nearest even on the float32 bits) so that Triton's interpreter, which truncates, rounds as GPUs do: the
tests run these kernels on CPU tensors under `TRITON_INTERPRET=1`.
"""
import contextlib
import functools
import logging
import typing as tp

import torch

logger = logging.getLogger(__name__)

__all__ = ['aten_forward', 'aten_backward', 'triton_forward', 'triton_backward', 'triton_ok', 'MAX_WIDTH']

MAX_WIDTH = 16384

Stats = tp.Tuple[tp.Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]


def aten_forward(x: torch.Tensor, y: tp.Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> Stats:
    """(h or None, out, mean, rstd) by ATen: `x + y` (type promotion, as the layer's residual add) and
    `native_layer_norm` in float32 (as CUDA's autocast runs it), the output cast to `dtype` (as its reader casts it)."""
    h = x if y is None else x + y
    out, mean, rstd = torch.native_layer_norm(h.float(), [h.shape[-1]], weight.float(), bias.float(), eps)
    return (None if y is None else h), out.to(dtype), mean, rstd


def aten_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  grad_h: tp.Optional[torch.Tensor] = None,
                  y_dtype: tp.Optional[torch.dtype] = None) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
    """(dx, dy or None) by ATen: the norm's input gradient (autograd's widening of the bf16 gradient, then
    `native_layer_norm_backward`), plus `grad_h` (autograd's sum of the two gradients of h), and that sum cast to the
    branch's dtype (autograd's cast for the add's bf16 operand)."""
    dx = torch.ops.aten.native_layer_norm_backward(grad.float(), h.float(), [h.shape[-1]], mean, rstd, weight.float(),
                                                   None, [True, False, False])[0].to(h.dtype)
    if grad_h is not None:
        dx = grad_h + dx
    # (copy: a float32 branch, e.g. AudioCraft's LayerScale, would get dx itself, and an op's outputs may not alias)
    return dx, (None if y_dtype is None else dx.to(y_dtype, copy=True))


@functools.lru_cache(maxsize=None)
def _kernels():
    """Imported at first use (norm_triton.py: Triton's JIT kernels, defined at import: `TRITON_INTERPRET=1` in the
    environment by then runs them on CPU tensors); an ImportError where there is no Triton."""
    from . import norm_triton
    return norm_triton.triton, norm_triton.forward_kernel, norm_triton.backward_kernel


def _config(width: int) -> dict:
    block = _kernels()[0].next_power_of_2(width)
    return {'BLOCK': block, 'num_warps': min(16, max(1, block // 256))}


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (several GPUs in one process)."""
    if device.type == 'cuda' and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # (int16: any Triton has it)


def triton_forward(x: torch.Tensor, y: tp.Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, dtype: torch.dtype) -> Stats:
    """`aten_forward` by the Triton kernel (float32 x; CUDA tensors, or CPU ones under `TRITON_INTERPRET=1`)."""
    _, forward_kernel, _ = _kernels()
    x = x.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width
    h = None if y is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    y = None if y is None else y.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    mean = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows:
        with _on(x.device):
            forward_kernel[(rows,)](x, x if y is None else y, x if h is None else h, weight.contiguous(),
                                    bias.contiguous(), _bits(out), mean, rstd, width, eps, HAS_Y=y is not None,
                                    OUT_BF16=dtype == torch.bfloat16, **_config(width))
    return h, out, mean, rstd


def triton_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, grad_h: tp.Optional[torch.Tensor] = None,
                    y_dtype: tp.Optional[torch.dtype] = None) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
    """`aten_backward` by the Triton kernel (float32 h)."""
    _, _, backward_kernel = _kernels()
    h, grad = h.contiguous(), grad.contiguous()
    grad_h = None if grad_h is None else grad_h.contiguous()
    width = h.shape[-1]
    rows = h.numel() // width
    dx = torch.empty_like(h)
    dy = None if y_dtype is None else torch.empty(h.shape, dtype=y_dtype, device=h.device)
    if rows:
        with _on(h.device):
            backward_kernel[(rows,)](grad, h, weight.contiguous(), mean, rstd, h if grad_h is None else grad_h, dx,
                                     dx if dy is None else _bits(dy), width, HAS_GH=grad_h is not None,
                                     HAS_DY=dy is not None, DY_BF16=y_dtype == torch.bfloat16,
                                     enable_fp_fusion=False, **_config(width))
    # (no multiply-add contraction: the stream's gradient added in the kernel is rounded as autograd's own add
    # rounds it where the norm runs alone, so a norm chained across layers gives the same gradients bit for bit)
    return dx, dy


_CHECKED: tp.Dict[tp.Tuple[torch.device, int], bool] = {}


def triton_ok(device: tp.Union[str, torch.device], width: int = 333) -> bool:
    """Whether the Triton kernels run on `device` at `width` and agree with ATen (once per device and width: the
    kernel compiles for each width anyway, with its own block size and warps): 70 rows with and without the residual
    add, of spread, nearly constant (where `eps` counts) and constant values, bf16 and fp16 outputs, and the backward
    with both gradients. Not checked during a CUDA graph capture (a check syncs): a first use inside one takes ATen's
    kernels (`check_kernels` runs the checks before training). A CUDA fault inside a check (an illegal address) would
    leave the context broken, beyond what a fall-back can mend."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    key = (device, int(width))
    if key in _CHECKED:
        return _CHECKED[key]
    if device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
        return False
    try:
        ok = _agrees(device, int(width))
        error = None if ok else "its results differ from ATen's"
    except Exception as exc:  # no Triton, an unsupported GPU, a compiler error: ATen's kernels, same values
        ok, error = False, f'{type(exc).__name__}: {exc}'
    if not ok:
        logger.warning("lora.fused_norms: the Triton layer-norm kernels can't be used on %s at width %d (%s); the "
                       "norms run ATen's kernels there (the same values, without the speed-up).", device, width, error)
    _CHECKED[key] = ok
    return ok


def _agrees(device: torch.device, width: int) -> bool:
    """The kernels against ATen at `width`: spread, nearly constant (`eps` counts) and constant rows; bf16, fp16 and
    float32 (LayerScale's) branches; gradients with a part along the normalized input (the backward's `xhat * c1`
    term), compared row by row (the nearly constant rows' gradients are ~1000x the others')."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    x = torch.cat([randn(64, width) * 3 + 1, 1 + 1e-4 * randn(5, width), torch.full((1, width), 0.5, device=device)])
    w, b = randn(width), randn(width)
    xhat = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-3)
    gh = randn(*x.shape)
    ok = True
    for dtype, branch_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                (torch.bfloat16, torch.float32)):
        y, g = randn(*x.shape).to(branch_dtype), (xhat + randn(*x.shape)).to(dtype)
        for branch in ((None, y) if branch_dtype != torch.float32 else (y,)):
            got, ref = triton_forward(x, branch, w, b, 1e-5, dtype), aten_forward(x, branch, w, b, 1e-5, dtype)
            ok &= all(_rows_close(a.float(), r.float(), 1e-2) for a, r in zip(got, ref) if r is not None)
            h = x if branch is None else ref[0]
            grads = (None, None) if branch is None else (gh, branch_dtype)
            (dx, dy), (rdx, rdy) = (triton_backward(g, h, w, ref[2], ref[3], *grads),
                                    aten_backward(g, h, w, ref[2], ref[3], *grads))
            ok &= _rows_close(dx, rdx, 1e-4)
            ok &= dy is None if rdy is None else _rows_close(dy.float(), rdy.float(), 1e-2)
    return ok


def _rows_close(got: torch.Tensor, ref: torch.Tensor, tolerance: float) -> bool:
    """Each row within `tolerance` of its own largest value (a row's scale, not the tensor's)."""
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return bool(((got - ref).abs() <= tolerance * scale).all())
