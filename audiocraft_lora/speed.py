"""Speed and memory settings of LoRA training (the `lora.*` keys below), applied to the LM and the optimizer.

    lora.fast_path: true                  # fast_lora: no W + BA, no frozen-weight gradient (exact; see fast_lora)
    lora.base_dtype: auto                 # auto | float32 | bfloat16 | float16: storage dtype of frozen projections
    lora.fused_optimizer: auto            # auto | true | false: torch's fused AdamW kernel (auto: on CUDA)
    lora.activation_checkpointing: none   # none | torch: recompute each transformer layer in backward
    lora.checkpoint_fraction: 1.0         # with torch: fraction of the layers recomputed (evenly spaced)
    lora.compile: none                    # none | inductor | aot_eager | ...: torch.compile each transformer layer

`compile` compiles each transformer layer in place (`nn.Module.compile`: parameter and state-dict names don't change)
for training and validation; AudioCraft's token-by-token generation runs eagerly (`eager_generation`). With the fast
path the layers trace whole (the only graph breaks are xformers' mask objects); peft's parametrized q/k/v breaks more.

`base_dtype: auto` stores the frozen base weights read only by the fast path in the autocast dtype when autocast is
on (what autocast would cast them to at every use: no result changes) and keeps float32 otherwise. A bf16/fp16
base_dtype needs autocast with that same dtype and the fast path; it is refused otherwise. Adapter weights always
stay float32 (they are the optimizer's masters).
"""
from dataclasses import dataclass, field, fields
import logging
import typing as tp

import torch
from torch import nn

from .errors import LoRAConfigError

logger = logging.getLogger(__name__)

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
CHECKPOINTING = ('none', 'torch')


@dataclass
class SpeedSettings:
    """How LoRA training runs (never what it computes): read from the `lora` section of the solver config."""
    fast_path: bool = field(default=True, metadata={
        'help': 'Low-rank products in one autograd node, fused q/k/v LoRA without parametrization (fast_lora).'})
    base_dtype: str = field(default='auto', metadata={
        'help': "Storage dtype of the frozen adapted projections: auto (autocast dtype under autocast, else "
                "float32) | float32 | bfloat16 | float16."})
    fused_optimizer: tp.Any = field(default='auto', metadata={
        'help': "torch's fused AdamW/Adam kernel for the adapter: auto (on CUDA) | true | false."})
    activation_checkpointing: str = field(default='none', metadata={
        'help': "none | torch: recompute each transformer layer in backward (AudioCraft's "
                "transformer_lm.checkpointing, non-reentrant so frozen inputs still give adapter gradients)."})
    compile: str = field(default='none', metadata={
        'help': "none, or a torch.compile backend (inductor on GPU; aot_eager to check correctness on CPU) applied "
                "to each transformer layer for training and validation."})
    checkpoint_fraction: float = field(default=1.0, metadata={
        'help': 'With activation_checkpointing=torch: the fraction of layers recomputed, evenly spaced (1.0: all). '
                'Trades memory (activations of the other layers are kept) for less recompute time.'})

    @classmethod
    def from_config(cls, cfg: tp.Any) -> 'SpeedSettings':
        data = {k: v for k, v in cfg.items()} if cfg is not None else {}
        settings = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data and data[f.name] is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if str(self.base_dtype) not in ('auto', *DTYPES):
            raise LoRAConfigError(f"lora.base_dtype must be auto, float32, bfloat16 or float16, got "
                                  f"{self.base_dtype!r}.")
        if str(self.fused_optimizer).lower() not in ('auto', 'true', 'false'):
            raise LoRAConfigError(f"lora.fused_optimizer must be auto, true or false, got {self.fused_optimizer!r}.")
        if not 0.0 < float(self.checkpoint_fraction) <= 1.0:
            raise LoRAConfigError(f"lora.checkpoint_fraction must be in (0, 1], got {self.checkpoint_fraction!r}.")
        if not isinstance(self.compile, str) or not self.compile:
            raise LoRAConfigError(f"lora.compile must be none or a torch.compile backend name, got {self.compile!r}.")
        if self.compile != 'none':
            import torch._dynamo
            if self.compile not in torch._dynamo.list_backends(exclude_tags=()):
                raise LoRAConfigError(f"lora.compile={self.compile!r} is not a torch.compile backend; choose none or "
                                      f"one of {sorted(torch._dynamo.list_backends(exclude_tags=()))}.")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise LoRAConfigError(f"lora.activation_checkpointing must be one of {list(CHECKPOINTING)}, got "
                                  f"{self.activation_checkpointing!r}.")

    def resolve_base_dtype(self, autocast: bool, autocast_dtype: torch.dtype) -> torch.dtype:
        """The storage dtype of frozen projections; raises if it can't be used with this autocast setting."""
        if self.base_dtype == 'auto':
            return autocast_dtype if (autocast and self.fast_path) else torch.float32
        dtype = DTYPES[self.base_dtype]
        if dtype is not torch.float32:
            if not self.fast_path:
                raise LoRAConfigError(f"lora.base_dtype={self.base_dtype} needs lora.fast_path=true.")
            if not autocast or dtype is not autocast_dtype:
                raise LoRAConfigError(
                    f"lora.base_dtype={self.base_dtype} needs autocast=true with autocast_dtype={self.base_dtype}: "
                    "frozen weights stored in low precision are only exact where autocast casts them anyway.")
        return dtype


def apply_to_model(model: nn.Module, settings: SpeedSettings, autocast: bool, autocast_dtype: torch.dtype) -> dict:
    """Activation checkpointing and frozen-base storage dtype, on an LM that already has LoRA injected."""
    from .fast_lora import cast_frozen_base
    info: tp.Dict[str, tp.Any] = {}
    transformer = getattr(model, 'transformer', None)
    if settings.activation_checkpointing != 'none':
        if transformer is None or not hasattr(transformer, 'checkpointing'):
            raise LoRAConfigError("lora.activation_checkpointing needs AudioCraft's StreamingTransformer LM.")
        transformer.checkpointing = settings.activation_checkpointing
        info['activation_checkpointing'] = settings.activation_checkpointing
        if float(settings.checkpoint_fraction) < 1.0:
            info['checkpointed_layers'] = checkpoint_some_layers(transformer, float(settings.checkpoint_fraction))
    dtype = settings.resolve_base_dtype(autocast, autocast_dtype)
    if dtype is not torch.float32:
        info['base_tensors_cast'] = cast_frozen_base(model, dtype)
    info['base_dtype'] = str(dtype).replace('torch.', '')
    if settings.compile != 'none':
        if transformer is None or not hasattr(transformer, 'layers'):
            raise LoRAConfigError("lora.compile needs AudioCraft's StreamingTransformer LM.")
        for layer in transformer.layers:
            layer.compile(backend=settings.compile)
        info['compile'] = settings.compile
    return info


def eager_generation(settings: SpeedSettings):
    """Context in which compiled layers run eagerly: AudioCraft's generation calls them one token at a time with a
    growing streaming cache, which would recompile at nearly every step."""
    import contextlib
    if settings.compile == 'none':
        return contextlib.nullcontext()
    return torch.compiler.set_stance('force_eager')


def _apply_layer_some(transformer: nn.Module, checkpointed: tp.FrozenSet[int], layer: nn.Module, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    if id(layer) in checkpointed:
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def checkpoint_some_layers(transformer: nn.Module, fraction: float) -> tp.List[int]:
    """Recompute only `fraction` of AudioCraft's transformer layers (evenly spaced) in backward; returns their
    indices. Replaces the instance's `_apply_layer` hook (AudioCraft's own applies one method to every layer)."""
    import functools
    layers = list(transformer.layers)
    count = max(1, round(fraction * len(layers)))
    indices = sorted({int(i * len(layers) / count) for i in range(count)})
    checkpointed = frozenset(id(layers[i]) for i in indices)
    transformer._apply_layer = functools.partial(_apply_layer_some, transformer, checkpointed)
    return indices


def optimizer_kwargs(settings: SpeedSettings, params: tp.Sequence[torch.Tensor], optimizer: str) -> dict:
    """Extra keyword arguments for torch's Adam/AdamW (`fused=True` on CUDA with `auto`)."""
    if optimizer not in ('adam', 'adamw'):
        return {}
    choice = str(settings.fused_optimizer).lower()
    on_cuda = all(p.is_cuda for p in params)
    if choice == 'true' or (choice == 'auto' and on_cuda):
        return {'fused': True}
    return {'foreach': True} if choice == 'auto' else {}
