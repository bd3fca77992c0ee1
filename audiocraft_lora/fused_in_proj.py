"""LoRA on AudioCraft's fused q/k/v `in_proj_weight` (self- and cross-attention) through the fast path (fast_lora).

The attention module gets a child `in_proj` (`FusedInProjLoRA`, holding `lora_A` [r, dim] and `lora_B` [3 * dim, r]:
canonical names `...self_attn.in_proj.lora_A.weight` as-is) and its class becomes `LoRAStreamingMultiheadAttention`,
whose `in_proj_weight` property returns, while the module's forward runs, a `LowRankWeight`: a tensor-like object (it
defines `__torch_function__`) that AudioCraft's unchanged attention code slices by rows (`w[:dim]` slices W and B, A
is shared) and hands to `F.linear`, which lands in `fast_lora.LowRankLinear`. Any other use in forward materialises
`W + s * B @ A` (correct, just not fast). The base parameter itself stays registered as `in_proj_weight` (state-dict
names don't change) and is what the property returns outside forward (`get_parameter` and the like). Under autocast A
and B are cast once per attention forward for all its q/k/v calls (or come from the model's shared copies,
adapter_casts).

The cross-attention projects its key and value from the same tensor (the text condition), with rows `[dim, 2 dim)`
and `[2 dim, 3 dim)` of the weight and the same A: the key's `F.linear` computes both in one `LowRankLinear` over
rows `[dim, 3 dim)` and leaves the value aside for the value's `F.linear`, which takes it if its input is that same
tensor (`COMBINE_CROSS_KV`: half the rank-r products, GEMMs and autograd nodes of those two projections, and one
gradient accumulation of A and B fewer; at small batches a step is bound by such launches). Each output element is
the same dot product; a value call on another input is computed on its own.
"""
import math
import typing as tp

from audiocraft.modules.transformer import StreamingMultiheadAttention
import torch
from torch import nn
from torch.nn import functional as F

from .adapter_casts import slots_of
from .fast_lora import LowRankLinear, _cast, _compute_dtype, _shared_casts

__all__ = ['LowRankWeight', 'FusedInProjLoRA', 'LoRAStreamingMultiheadAttention', 'inject_fused_in_proj']


def _span(rows: slice, length: int) -> tp.Optional[tp.Tuple[int, int]]:
    """The rows `[start, stop)` a step-1 slice takes of `length` rows (None if it takes none or steps); plain
    arithmetic, which torch.compile traces (`slice.indices` it can't)."""
    if rows.step not in (None, 1):
        return None
    start = 0 if rows.start is None else rows.start + (length if rows.start < 0 else 0)
    stop = length if rows.stop is None else rows.stop + (length if rows.stop < 0 else 0)
    start, stop = min(max(start, 0), length), min(max(stop, 0), length)
    return (start, stop) if stop > start else None


# cross-attention key and value from one product (see the module doc); off: each projected on its own
COMBINE_CROSS_KV = True


class LowRankWeight:
    """Stands for `W + s * B @ A` ([out, in]) without building it: `F.linear` on it goes through `LowRankLinear`.

    Row slices (what AudioCraft's cross-attention does to split q/k/v) slice W and B and keep A. Any other torch
    function receives the materialised weight. `pending` (the attention's, for one forward) is where the key's call
    leaves the value it computed with it; `rows` is the slice's place in the whole weight.
    """

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 dropout: float = 0.0, a_cast: tp.Optional[torch.Tensor] = None,
                 b_cast: tp.Optional[torch.Tensor] = None, pending: tp.Optional[dict] = None,
                 rows: tp.Optional[tp.Tuple[int, int]] = None, whole: tp.Optional['LowRankWeight'] = None,
                 keep_merged: bool = False):
        self.weight, self.lora_a, self.lora_b, self.scaling, self.dropout = weight, lora_a, lora_b, scaling, dropout
        self.a_cast, self.b_cast = a_cast, b_cast  # A and B in the compute dtype, if the attention has them
        self.pending, self.whole, self.keep_merged = pending, whole, keep_merged
        self.rows = (0, weight.shape[0]) if rows is None else rows

    shape = property(lambda self: self.weight.shape)
    dtype = property(lambda self: self.weight.dtype)
    device = property(lambda self: self.weight.device)
    ndim = property(lambda self: self.weight.ndim)

    def size(self, dim: tp.Optional[int] = None):
        return self.weight.size() if dim is None else self.weight.size(dim)

    def __getitem__(self, index):
        rows = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        if not isinstance(rows, slice):
            return self.materialize()[index]
        span = _span(rows, self.weight.shape[0])
        place = None if span is None else (self.rows[0] + span[0], self.rows[0] + span[1])
        return LowRankWeight(self.weight[rows], self.lora_a, self.lora_b[rows], self.scaling, self.dropout,
                             self.a_cast, None if self.b_cast is None else self.b_cast[rows],
                             self.pending if place else None, place, self.whole or self, self.keep_merged)

    def materialize(self) -> torch.Tensor:
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
        return self.weight + delta.to(self.weight.dtype)

    def __repr__(self) -> str:
        return (f"LowRankWeight(shape={tuple(self.shape)}, rank={self.lora_a.shape[0]}, scaling={self.scaling}, "
                f"dtype={self.dtype})")

    def linear(self, x: torch.Tensor, bias: tp.Optional[torch.Tensor]) -> torch.Tensor:
        return LowRankLinear.apply(x, self.weight, bias, self.lora_a, self.lora_b, float(self.scaling),
                                   float(self.dropout), False, self.a_cast, self.b_cast, self.keep_merged)

    def cross_kv_linear(self, x: torch.Tensor, bias: tp.Optional[torch.Tensor]) -> tp.Optional[torch.Tensor]:
        """The key's projection, with the value's computed beside it and left in `pending`; or the value's, taken
        from there when its input is the key's. None where neither applies."""
        if self.pending is None or bias is not None or not COMBINE_CROSS_KV:
            return None
        whole = self.whole
        dim = whole.shape[0] // 3
        if self.rows == (2 * dim, 3 * dim):
            kept = self.pending.pop('value', None)
            return kept[1] if kept is not None and kept[0] is x else None
        if self.rows != (dim, 2 * dim) or whole.shape[0] != 3 * dim:
            return None
        key, value = whole[dim:].linear(x, None).split(dim, dim=-1)
        self.pending['value'] = (x, value)
        return key

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs['weight']
            bias = args[2] if len(args) > 2 else kwargs.get('bias')
            if isinstance(weight, LowRankWeight) and not isinstance(x, LowRankWeight):
                out = weight.cross_kv_linear(x, bias) if weight.whole is not None else None
                return weight.linear(x, bias) if out is None else out

        def unwrap(value):
            if isinstance(value, LowRankWeight):
                return value.materialize()
            if isinstance(value, (list, tuple)):
                return type(value)(unwrap(v) for v in value)
            return value
        return func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})


class FusedInProjLoRA(nn.Module):
    """The LoRA pair of a fused q/k/v `in_proj_weight` [3 * dim, dim]: `lora_A` [r, dim], `lora_B` [3 * dim, r].

    Initialised like peft (A: Kaiming-uniform as nn.Linear, B: zeros), so the adapter starts as the identity.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.scaling = scaling
        self.active = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return f'scaling={self.scaling}, active={self.active}'


def _lora_in_proj_weight(self):
    weight = self._parameters['in_proj_weight']
    lora = self._modules.get('in_proj')
    if lora is None or not lora.active or not self.__dict__.get('_lora_in_forward', False):
        return weight
    a_cast, b_cast = self.__dict__.get('_lora_forward_casts') or (None, None)
    return LowRankWeight(weight, lora.lora_A.weight, lora.lora_B.weight, lora.scaling, a_cast=a_cast, b_cast=b_cast,
                         pending=self.__dict__.get('_lora_pending'),
                         keep_merged=self.__dict__.get('_lora_keep_merged', False))


def _forward_casts(lora: tp.Optional['FusedInProjLoRA'], x: torch.Tensor):
    """A and B of a fused q/k/v LoRA in x's compute dtype, once for all the q/k/v calls of one attention forward (the
    cross-attention makes three): the model's shared copies (adapter_casts), else cast here. None where nothing is
    cast (no autocast) or inside torch.compile (the compiled graph casts)."""
    if lora is None or not lora.active or torch.compiler.is_compiling():
        return None
    a, b = lora.lora_A.weight, lora.lora_B.weight
    dtype = _compute_dtype(x)
    if a.dtype == dtype:
        return None
    a_cast, b_cast = _shared_casts(x, slots_of(lora), a, b)
    with torch.no_grad():
        return (_cast(a, dtype) if a_cast is None else a_cast), (_cast(b, dtype) if b_cast is None else b_cast)


class LoRAStreamingMultiheadAttention(StreamingMultiheadAttention):
    """AudioCraft's attention, unchanged, whose `in_proj_weight` reads as `W + s * B @ A` (a `LowRankWeight`) while
    its forward runs; outside it, the base Parameter (what `get_parameter`, `named_parameters` users expect)."""
    in_proj_weight = property(_lora_in_proj_weight)  # type: ignore[assignment]

    def forward(self, query: torch.Tensor, *args, **kwargs):
        self._lora_in_forward = True
        self._lora_forward_casts = _forward_casts(self._modules.get('in_proj'), query)
        self._lora_pending = {} if self.cross_attention else None  # the value the key's projection computed
        try:
            return super().forward(query, *args, **kwargs)
        finally:
            self._lora_in_forward, self._lora_forward_casts, self._lora_pending = False, None, None


def inject_fused_in_proj(attention: nn.Module, rank: int, scaling: float) -> FusedInProjLoRA:
    """Give an AudioCraft attention module a `FusedInProjLoRA` on its `in_proj_weight` (in place)."""
    if type(attention) not in (StreamingMultiheadAttention, LoRAStreamingMultiheadAttention):
        raise TypeError(f"Fast fused in_proj LoRA supports AudioCraft's StreamingMultiheadAttention, "
                        f"not {type(attention).__name__}: set lora.fast_path=false.")
    weight = attention._parameters['in_proj_weight']
    out_features, in_features = weight.shape
    lora = FusedInProjLoRA(in_features, out_features, rank, scaling, device=weight.device, dtype=torch.float32)
    attention.add_module('in_proj', lora)
    attention.__class__ = LoRAStreamingMultiheadAttention
    return lora
