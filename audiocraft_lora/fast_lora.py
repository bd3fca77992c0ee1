"""Fast LoRA path: one autograd node per adapted projection, no frozen weight's gradient, no `W + s * B @ A` kept.

Every adapted projection computes, in one autograd node (`LowRankLinear`)::

    y = x @ W^T (+ bias) + s * (dropout(x) @ A^T) @ B^T          x [N, in], W [out, in], A [r, in], B [out, r]

Backward gives `dx = g @ W + s * ((g @ B) @ A) * mask`, `dA = s * (g @ B)^T @ dropout(x)`, `dB = s * g^T @ (x A^T)`:
the `[out, in]` weight-gradient GEMM of the frozen base, a third of a full fine-tune's matmul FLOPs, is skipped, and
saved activations are the (cast) input (with dropout: dropout(x) and its mask), the `[N, r]` product, nothing
`[out, in]`-sized. Without dropout (lora.dropout=0, and always in eval) and with more rows than twice the input
width (training batches, not generation steps) `y = x @ (W + s B A)^T` and `dx = g @ (W + s B A)`: the merged
weight is built in forward and again in backward (an r-deep product at `[out, in]`; kept from forward instead with
`keep_merged`, `lora.keep_merged_weights`), which saves the two passes over `[N, out]` and `[N, in]` that adding the
rank-r update costs; on an H100 at musicgen-small's shapes each of those passes takes about as long as the base GEMM
(`benchmarks/lora_gemms.py`).

The scaling `s` rides in the rank-r GEMMs (`alpha` of an `addmm` whose input beta=0 ignores), not in a pass of its
own; the adapter's float32 gradients come from GEMMs that write float32 on CUDA (`out_dtype`), elsewhere autograd
casts them; under autocast A and B are cast once per optimizer step for the whole model (adapter_casts), or once per
attention forward for its q/k/v slices. At small batches a GPU step is bound by kernel launches, and these are what
the LoRA path adds per projection (`benchmarks/step_time.py`, `launches` column).

With `replay` (`lora.dropout_replay`, which `activation_checkpointing=auto` turns on when memory is short) the mask
is not kept but drawn again in backward from the forward's generator state (`_replay_dropout`, as torch's activation
checkpointing replays dropout): a byte less per input element of every adapted projection, for one more dropout
pass. Under autocast everything is cast to the autocast dtype exactly as `F.linear` would cast it (so frozen base
weights may be stored in that dtype: `cast_frozen_base`).

Where it is used:

- peft's `lora.Linear` (out_proj, linear1, linear2): injection stays peft's, names and merge/unmerge too; the
  instance's class becomes `FastLoraLinear`, whose `forward` takes this path for the plain single-adapter case and
  falls back to peft's own forward otherwise (merged, disabled, several adapters, variants).
- AudioCraft's fused q/k/v `in_proj_weight` (self- and cross-attention): `fused_in_proj`, whose row-sliced weight
  view hands `F.linear` to `LowRankLinear`.
"""
import typing as tp

from peft.tuners.lora import Linear as LoraLinear
import torch
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn import functional as F

from . import dropout_kernels
from .adapter_casts import lookup, slots_of

__all__ = ['LowRankLinear', 'FastLoraLinear', 'low_rank_linear', 'one_product', 'undropped', 'enable_fast_linear',
           'cast_frozen_base']


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class LowRankLinear(torch.autograd.Function):
    """`x @ W^T + bias + s * (dropout(x) @ A^T) @ B^T` with the frozen W's gradient skipped (see module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor],  # type: ignore
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout: float,
                replay: bool = False, a_cast: tp.Optional[torch.Tensor] = None,
                b_cast: tp.Optional[torch.Tensor] = None, keep_merged: bool = False,
                kernel: bool = False) -> torch.Tensor:
        # every operand is cast to the compute dtype here, so autocast (if on) has nothing left to cast: no context
        # manager needed to turn it off (a Python-level cost paid by every projection, twice per step). `a_cast` and
        # `b_cast`: the adapter already in that dtype (adapter_casts: one cast per step for the whole model)
        dtype = _compute_dtype(x)
        w = _cast(weight, dtype)
        a = a_cast if a_cast is not None and a_cast.dtype == dtype else _cast(lora_a, dtype)
        b = b_cast if b_cast is not None and b_cast.dtype == dtype else _cast(lora_b, dtype)
        bias = None if bias is None else _cast(bias, dtype)
        mask = None
        # LoRA dropout inside the rank-r products (dropout_kernels): no mask, no dropped-out copy, nothing replayed
        ctx.kernel = kernel and dropout > 0 and dropout_kernels.applies(x, dtype, a.shape[0])
        ctx.rng = _rng_state(x) if dropout > 0 and replay and not ctx.kernel else None
        ctx.merged = dropout == 0 and _merge_pays(x, w.shape[0], ctx.needs_input_grad[0], keep_merged)
        xu = kept = None
        if (dropout > 0 and not ctx.kernel and 'dropout_forward' in CONCAT_RANK_GEMMS
                and (x.dtype != dtype or x.shape[-1] < w.shape[0])):
            # y = [x | u] [W | s B]^T: x is written (cast, which it needs anyway, or copied where the input is
            # narrower than the output) beside u, instead of a second pass over the [N, out] output for `+ s u B^T`
            xu = x.new_empty(*x.shape[:-1], x.shape[-1] + a.shape[0], dtype=dtype)
            xc = xu[..., :x.shape[-1]].copy_(x)
        else:
            xc = _cast(x, dtype)
        xd = xc
        if ctx.merged:
            # no dropout: one GEMM with `W + s B A` (built at [out, in], r-deep: cheap) instead of a second pass
            # over the [N, out] output (`y + s u B^T` costs about as much as the base GEMM itself)
            concat = ctx.needs_input_grad[4] and 'forward' in CONCAT_RANK_GEMMS  # (dB needs u: not validation)
            if concat:  # `W + s B A` built into the first rows of [W + s B A; s A], no cat: one GEMM gives y and u
                out = w.shape[0]
                stacked = w.new_empty(out + a.shape[0], w.shape[1])
                merged = torch.addmm(w, b, a, alpha=scaling, out=stacked[:out])
                torch.mul(a, scaling, out=stacked[out:])
            else:
                merged = torch.addmm(w, b, a, alpha=scaling)
            kept = merged if keep_merged and ctx.needs_input_grad[0] else None  # backward's dx reuses it
            if concat:  # one pass over x for both; y and u are column views of the product (u: row stride out + r)
                yu = F.linear(xc, stacked, None if bias is None else torch.cat([bias, bias.new_zeros(a.shape[0])]))
                y, u = yu[..., :out], yu[..., out:].reshape(-1, a.shape[0])
            else:
                y = F.linear(xc, merged, bias)
                u = _scaled_mm(_rows(xc), a.t(), scaling) if ctx.needs_input_grad[4] else None  # dB's (not validation)
        else:
            if ctx.kernel:  # the seed rides in the mask's slot: all backward needs to draw the same decisions
                mask = dropout_kernels.draw_seed(xc.device)
                if _beside_pays(x.shape[-1], w.shape[0], a.shape[0]):  # [x | u] from one pass: one GEMM
                    xu = dropout_kernels.rank_product_beside(_rows(xc), a, mask, scaling, dropout)
                    xd, u = xu[:, :x.shape[-1]], xu[:, x.shape[-1]:]
                    xu = xu.view(*x.shape[:-1], -1)
                else:
                    u = dropout_kernels.rank_product(_rows(xc), a, mask, scaling, dropout)
            else:
                if dropout > 0:
                    xd, mask = torch.native_dropout(xc, dropout, True)
                u = _scaled_mm(_rows(xd), a.t(), scaling)  # s x A^T [N, r]: the scaling in the GEMM, not a pass
            if xu is not None:
                if not ctx.kernel:  # (the kernel wrote u there itself)
                    xu[..., x.shape[-1]:] = u.view(*x.shape[:-1], -1)
                y = F.linear(xu, torch.cat([w, b], dim=1), bias)
            else:
                y = F.linear(xc, w, bias)
                # out of place: selective activation checkpointing (recompute.py) keeps the base product `y` and
                # recomputes this cheap rank-r update; an in-place add would change the tensor it keeps
                y = torch.addmm(y.view(-1, y.shape[-1]), u, b.t()).view(y.shape)
        ctx.scaling, ctx.dropout, ctx.dtype, ctx.has_bias = scaling, dropout, dtype, bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype
        # a and b as cast here (rank-r, small): backward reuses them instead of casting the adapter again
        if ctx.rng is not None:  # keep the input (often saved anyway), not dropout(x) and its mask (replayed)
            ctx.save_for_backward(xc, u, weight, a, b, None, None)
        else:
            ctx.save_for_backward(xd, u, weight, a, b, mask, kept)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore
        xd, u, weight, a, b, mask, kept = ctx.saved_tensors
        if ctx.rng is not None:
            xd, mask = _replay_dropout(xd, ctx.dropout, ctx.rng)
        dtype, s = ctx.dtype, ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        out_features = grad.shape[-1]
        g = _cast(grad, dtype).reshape(-1, out_features)  # (all operands in the compute dtype, as in forward)
        grad_x = grad_w = grad_bias = grad_a = grad_b = gb = None
        if need_x:
            w = _cast(weight, dtype)
            if kept is not None:  # the forward's W + s B A (lora.keep_merged_weights)
                base = kept
            else:  # g (W + s B A), as in forward, built again
                base = torch.addmm(w, b, a, alpha=s) if ctx.merged else w
            if ctx.kernel:  # g W, then + (s g B) A * keep / (1 - p) in place: the rank-r product never written
                grad_x = torch.mm(g, base)
                gb = _scaled_mm(g, b, s)
                if need_a and dropout_kernels.FUSED_BACKWARD:  # (and dA from the same pass, the draws once)
                    grad_a = dropout_kernels.masked_backward_(grad_x, gb, a, _rows(xd), mask, ctx.dropout)
                else:
                    dropout_kernels.masked_update_(grad_x, gb, a, mask, ctx.dropout)
            elif 'backward' in CONCAT_RANK_GEMMS and (need_a or not ctx.merged):
                # g W and s g B ([N, r], for dA and the unmerged dx) from one GEMM over [W | s B]: one pass over g
                in_features = w.shape[1]
                both = torch.mm(g, torch.cat([base, b * s], dim=1))
                grad_x, gb = both[:, :in_features], both[:, in_features:]
            else:
                grad_x = torch.mm(g, base)
                gb = _scaled_mm(g, b, s) if not ctx.merged else None
            if ctx.kernel or ctx.merged:  # (the rank-r part is in dx already)
                pass
            elif mask is None:
                grad_x = grad_x.addmm_(gb, a)
            else:  # g W + ((s g B) A) * mask / (1 - p): mask, dropout scale and add in one addcmul_
                grad_x = grad_x.addcmul_(torch.mm(gb, a), mask.reshape(-1, mask.shape[-1]),
                                         value=1.0 / (1.0 - ctx.dropout))
            grad_x = grad_x.view(*grad.shape[:-1], -1)  # (autograd casts it to x's dtype)
        if need_a and gb is None:
            gb = _scaled_mm(g, b, s)  # [N, r]: s * g @ B
        if need_w:  # only when the base weight itself is trainable: never in LoRA training
            grad_w = _grad_mm(g.t(), _recompute_input(xd, mask, ctx.dropout), ctx.w_dtype)
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a and grad_a is None:  # (the kernel's in float32: the adapter's dtype, or autograd casts it)
            grad_a = (dropout_kernels.rank_grad(gb, _rows(xd), mask, ctx.dropout) if ctx.kernel
                      else _grad_mm(gb.t(), _rows(xd), ctx.a_dtype))
        if need_b:
            grad_b = _grad_mm(g.t(), u, ctx.b_dtype)  # u = s x A^T: dB = s g^T x A^T
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, None, None, None


# Where one GEMM gives both a base product and the rank-r product that reads the same big operand, instead of a
# second memory-bound pass over x or g: 'forward' (merged: y and u = x A^T over [W + s B A; s A], the merged weight
# built in place into its rows: no cat, the same launch count as without; since session 10), 'dropout_forward'
# (y = [x | u] [W | s B]^T, x cast into the buffer beside u), 'backward' (dx and s g B over [W | s B]). Off: all
# three on measured on an H100 (bf16, rank 16, 30 s) 0.296 vs 0.335 s at musicgen-medium batch 4 but 0.212 vs 0.204 s
# at small batch 16, 0.273 vs 0.247 s with dropout 0.05, 0.170 vs 0.141 s at small batch 4 (strided outputs, wider
# GEMMs, more launches). Each alone inside the layers' graphs at small batch 16 (`lora_graphed_concat`): 'forward'
# 1.11x slower (H100, session 18), 'backward' 1.056x, 'forward' + 'backward' 1.152x (H200, session 20): none pays.
CONCAT_PARTS = ('forward', 'dropout_forward', 'backward')
CONCAT_RANK_GEMMS: tp.FrozenSet[str] = frozenset()


def _beside_pays(in_features: int, out_features: int, rank: int) -> bool:
    """With LoRA dropout drawn by dropout_kernels: whether to write x beside u (`[x | u]`, one pass, the rank-r part in
    the base GEMM: [N, in + r] written) rather than add `u B^T` to the base product (its [N, out] read and written):
    where the input is narrower than the output (linear1), and `[x | u]`'s and `[W | B]`'s rows (in + r elements
    apart) stay 16-byte aligned in 16-bit floats, as cuBLAS's fastest GEMMs want (a rank that is a multiple of 8;
    MusicGen's widths are)."""
    return in_features < out_features and (in_features + rank) % 8 == 0


def _merge_pays(x: torch.Tensor, out_features: int, need_dx: bool, keep: bool) -> bool:
    """Building `W + s B A` reads and writes [out, in] (again in backward for dx, unless kept); adding the rank-r
    update instead reads and writes the [N, out] output (and the [N, in] dx in backward) and launches more kernels:
    merge where the merged weight moves no more bytes (training batches; not the few rows of a generation step)."""
    rows, in_features = x.numel() // x.shape[-1], x.shape[-1]
    merge = 2 * out_features * in_features * (2 if need_dx and not keep else 1)
    update = 2 * rows * (out_features + (in_features if need_dx else 0))
    return update >= merge


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, s: float) -> torch.Tensor:
    """`s * m1 @ m2` in one GEMM: alpha = s, and beta = 0 ignores the (uninitialised) input: no fill, no second
    pass to scale."""
    if s == 1.0:
        return torch.mm(m1, m2)
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=s)


def _grad_mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`m1 @ m2` for a gradient kept in `dtype` (float32 adapter masters): on CUDA one bf16/fp16 GEMM writing float32
    (`out_dtype`) instead of a GEMM and a cast; elsewhere the product in the compute dtype, which autograd casts to
    the parameter's dtype (the same cast, without a Python call)."""
    if m1.dtype != dtype and dtype == torch.float32 and _fp32_out_gemm(m1):
        return torch.mm(m1, m2, out_dtype=dtype)
    return torch.mm(m1, m2)


_FP32_OUT_GEMM: tp.Dict[tp.Any, bool] = {}


def _fp32_out_gemm(t: torch.Tensor) -> bool:
    """Whether `torch.mm(..., out_dtype=torch.float32)` works for `t`'s device and dtype (CUDA, bf16/fp16; checked
    once per device against a float32 product). Not inside torch.compile or on fake tensors."""
    if type(t) is not torch.Tensor:  # fake tensors: the memory estimate, and dynamo's tracing (torch.compile)
        return False
    if t.device.type != 'cuda' or t.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (t.device, t.dtype)
    if key not in _FP32_OUT_GEMM:
        try:
            gen = torch.Generator(device=t.device).manual_seed(0)
            m1 = torch.randn(64, 48, device=t.device, generator=gen).to(t.dtype)
            m2 = torch.randn(48, 32, device=t.device, generator=gen).to(t.dtype)
            out = torch.mm(m1, m2, out_dtype=torch.float32)
            ref = m1.float() @ m2.float()
            _FP32_OUT_GEMM[key] = bool(out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-3, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_GEMM[key] = False
    return _FP32_OUT_GEMM[key]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_FAKE_STATE = torch.empty(0, dtype=torch.uint8)


def _rng_state(x: torch.Tensor) -> tp.Optional[torch.Tensor]:
    """State of the generator dropout on `x` is about to draw from, to replay the same mask in backward (as torch's
    activation checkpointing does). None where it is not replayed (other devices, inside torch.compile): the mask is
    saved instead."""
    if torch.compiler.is_compiling():
        return None
    if isinstance(x, FakeTensor) or active_fake_mode() is not None:  # memory_estimate's fake step: the same tensors
        # kept, no data to draw, and the generators of the real run left alone
        return _FAKE_STATE
    if x.device.type == 'cuda':
        return torch.cuda.get_rng_state(x.device)
    if x.device.type == 'cpu':
        return torch.get_rng_state()
    return None


def _replay_dropout(x: torch.Tensor, p: float, state: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """`torch.native_dropout(x, p, True)` drawn from `state`: the forward's output and mask, bit for bit. The
    generator is left as it was."""
    if state is _FAKE_STATE:
        return torch.native_dropout(x, p, True)
    cuda = x.device.type == 'cuda'
    with torch.random.fork_rng(devices=[x.device] if cuda else [], device_type='cuda'):
        if cuda:
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return torch.native_dropout(x, p, True)


def _recompute_input(xd: torch.Tensor, mask: tp.Optional[torch.Tensor], dropout: float) -> torch.Tensor:
    if mask is not None:
        raise RuntimeError("A trainable base weight with LoRA dropout is not supported by the fast LoRA path: "
                           "freeze the base (as inject_lora does) or set lora.fast_path=false.")
    return xd.reshape(-1, xd.shape[-1])


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float, dropout: float = 0.0, replay: bool = False,
                    casts: tp.Tuple[tp.Any, tp.Any] = (None, None), keep_merged: bool = False,
                    kernel: bool = False) -> torch.Tensor:
    """Functional entry point of `LowRankLinear`; `dropout` is the probability applied in this call; `replay`: keep
    no mask, draw it again in backward (less memory, one more dropout pass); `casts`: the `adapter_casts` slots of
    lora_a and lora_b, if any; `keep_merged`: keep the merged weight the forward built for backward's dx (one
    [out, in] copy per projection until its backward, one GEMM launch fewer); `kernel`: the dropout drawn inside
    the rank-r products where `dropout_kernels` applies (no mask kept; `replay` then has nothing to do)."""
    a_cast, b_cast = _shared_casts(x, casts, lora_a, lora_b)
    return LowRankLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout), bool(replay),
                               a_cast, b_cast, bool(keep_merged), bool(kernel))


def _shared_casts(x: torch.Tensor, casts: tp.Tuple[tp.Any, tp.Any], lora_a: torch.Tensor, lora_b: torch.Tensor):
    """lora_a and lora_b in x's compute dtype from the model's `AdapterCasts`, or None for either where the Function
    should cast it (no slots, the memory estimate's fake tensors, inside torch.compile: see adapter_casts)."""
    if casts[0] is None or isinstance(x, FakeTensor) or torch.compiler.is_compiling():
        return None, None
    dtype = _compute_dtype(x)
    return lookup(casts[0], lora_a, dtype), lookup(casts[1], lora_b, dtype)


class FastLoraLinear(LoraLinear):
    """peft's `lora.Linear`, whose forward takes `LowRankLinear` in the plain single-adapter case."""

    def _fast_adapter(self, kwargs) -> tp.Optional[str]:
        if kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if (name not in self.lora_A or name in getattr(self, 'lora_variant', {})
                or getattr(self, 'lora_bias', {}).get(name, False)):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: tp.Any, **kwargs: tp.Any) -> torch.Tensor:
        name = self._fast_adapter(kwargs) if not args else None
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        base = self.base_layer
        return low_rank_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name], p, getattr(self, '_lora_replay_dropout', False),
                               slots_of(self, name), self.__dict__.get('_lora_keep_merged', False),
                               self.__dict__.get('_lora_dropout_kernel', False))


def _fast_dropout(linear: nn.Module, x: torch.Tensor) -> tp.Optional[str]:
    """How `linear` trains on `x`: None (not on the fast LoRA path: `FastLoraLinear`, one plain adapter), 'none' (no
    LoRA dropout), 'kernel' (LoRA dropout drawn inside the rank-r products: dropout_kernels) or 'torch'."""
    if not isinstance(linear, FastLoraLinear):
        return None
    name = linear._fast_adapter({})
    if name is None:
        return None
    dropout = linear.lora_dropout[name]
    if not (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0):
        return 'none'
    kernel = linear.__dict__.get('_lora_dropout_kernel', False) and dropout_kernels.applies(
        x, _compute_dtype(x), linear.lora_A[name].weight.shape[0])
    return 'kernel' if kernel else 'torch'


def undropped(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear` trains on `x`'s device and dtype on the fast LoRA path (`FastLoraLinear`, one plain adapter)
    saving its input itself for its LoRA: without LoRA dropout, or with dropout_kernels' (no mask, no dropped-out
    copy)."""
    return _fast_dropout(linear, x) in ('none', 'kernel')


def one_product(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether peft LoRA projection `linear`'s training output on `x` is one GEMM's output, nothing added after it:
    the fast path without LoRA dropout where the merged weight pays (`_merge_pays`; training batches), or with
    dropout_kernels' LoRA dropout where `[x | u] [W | B]^T` is the projection (`_beside_pays`)."""
    how = _fast_dropout(linear, x)
    out_features = linear.base_layer.weight.shape[0] if how is not None else 0
    if how == 'kernel':
        return _beside_pays(x.shape[-1], out_features, linear.lora_A[linear._fast_adapter({})].weight.shape[0])
    return how == 'none' and _merge_pays(x, out_features, x.requires_grad,
                                         linear.__dict__.get('_lora_keep_merged', False))


def enable_fast_linear(model: nn.Module) -> int:
    """Switch every peft `lora.Linear` of `model` to `FastLoraLinear` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FastLoraLinear
            count += 1
    return count


def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen base weights that only the fast LoRA path reads in `dtype` (bf16/fp16 under autocast).

    These are the base weights (and biases) of `FastLoraLinear` modules and the `in_proj_weight`/`in_proj_bias` of
    attention with a fused LoRA: `LowRankLinear` casts them to the autocast dtype anyway, so storing them in that
    dtype changes no result and saves the float32 copy and the per-step cast. Adapter parameters stay as they are.
    Returns the number of tensors cast.
    """
    from .fused_in_proj import LoRAStreamingMultiheadAttention
    count = 0
    for module in model.modules():
        tensors: tp.List[tp.Tuple[nn.Module, str]] = []
        if isinstance(module, FastLoraLinear):
            tensors = [(module.base_layer, 'weight'), (module.base_layer, 'bias')]
        elif isinstance(module, LoRAStreamingMultiheadAttention) and 'in_proj' in module._modules:
            tensors = [(module, 'in_proj_weight'), (module, 'in_proj_bias')]
        for owner, name in tensors:
            param = owner._parameters.get(name)
            if param is None or param.requires_grad or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            count += 1
    return count
