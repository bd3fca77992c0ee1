"""LoRA on AudioCraft's transformer LM through `peft`: settings, injection, adapter state, merge.

Targets use short, architecture-level names (see `TARGETS`). The fused q/k/v projection of AudioCraft's attention
is a raw `in_proj_weight` Parameter that `nn.Linear`-based LoRA can't reach; peft's `target_parameters` wraps it
(`ParamWrapper`, no dropout there). Every other target is an `nn.Linear` wrapped by peft's `lora.Linear`.
With `fast_path` (the default) the fused q/k/v gets `fused_in_proj.FusedInProjLoRA` instead of peft's parametrization and
every LoRA projection runs `fast_lora.LowRankLinear` (no `W + B @ A` built, no frozen-weight gradient): same names,
same results.

Adapter tensors are exchanged under *canonical* names that don't depend on peft's wrapping order::

    transformer.layers.{i}.self_attn.in_proj.lora_A.weight        [r, dim]
    transformer.layers.{i}.self_attn.in_proj.lora_B.weight        [3 * dim, r]   (q, k, v stacked in that order)
    transformer.layers.{i}.self_attn.out_proj.lora_A.weight       [r, dim]
    transformer.layers.{i}.cross_attention.{in_proj,out_proj}...  (text models only)
    transformer.layers.{i}.linear1.lora_A.weight / linear2 ...    feed-forward

A delta is `scaling * B @ A`, with `scaling = alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA).
"""
from dataclasses import asdict, dataclass, field, fields
import logging
import math
import re
import typing as tp

import torch
from torch import nn

from .errors import LoRAConfigError

logger = logging.getLogger(__name__)

ADAPTER_NAME = 'default'

# user-facing target name -> (kind, suffix matched on module names inside the transformer layers)
TARGETS: tp.Dict[str, tp.Tuple[str, str]] = {
    'self_attn.in_proj': ('param', 'self_attn.in_proj_weight'),
    'self_attn.out_proj': ('module', 'self_attn.out_proj'),
    'cross_attention.in_proj': ('param', 'cross_attention.in_proj_weight'),
    'cross_attention.out_proj': ('module', 'cross_attention.out_proj'),
    'linear1': ('module', 'linear1'),
    'linear2': ('module', 'linear2'),
}
DEFAULT_TARGETS = list(TARGETS)
_CROSS_TARGETS = {'cross_attention.in_proj', 'cross_attention.out_proj'}


@dataclass
class LoRASettings:
    """LoRA hyper-parameters, read from the `lora` section of the solver config."""
    rank: int = field(default=32, metadata={'help': 'LoRA rank r (> 0).'})
    alpha: float = field(default=64.0, metadata={'help': 'LoRA alpha; the delta is scaled by alpha / rank.'})
    dropout: float = field(default=0.05, metadata={
        'help': 'Dropout on the LoRA input of nn.Linear targets. The fused q/k/v (in_proj) path has none.'})
    targets: tp.List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={
        'help': f'Where LoRA goes, any of {DEFAULT_TARGETS}. Cross-attention targets are skipped, with a '
                'message, on bases without cross-attention (melody).'})
    use_rslora: bool = field(default=False, metadata={'help': 'Scale by alpha / sqrt(rank) (rsLoRA).'})
    init: str = field(default='default', metadata={
        'help': "'default': A random, B zero (adapter starts as the identity); 'random': both random, for "
                "tests and sanity checks only."})

    @classmethod
    def from_config(cls, cfg: tp.Any) -> 'LoRASettings':
        """Build from a dict/DictConfig; unknown keys are ignored (forward-compatible)."""
        if cfg is None:
            return cls()
        if hasattr(cfg, 'items'):
            data = {k: v for k, v in cfg.items()}
        else:
            data = dict(cfg)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if 'targets' in kwargs and kwargs['targets'] is not None:
            kwargs['targets'] = [str(t) for t in kwargs['targets']]
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoRAConfigError(f"lora.rank must be a positive integer, got {self.rank!r}. Try lora.rank=32.")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise LoRAConfigError(f"lora.alpha must be > 0, got {self.alpha!r}. A common choice is 2 * rank.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoRAConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise LoRAConfigError(f"lora.targets is empty: choose some of {DEFAULT_TARGETS}.")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise LoRAConfigError(
                f"Unknown LoRA target(s) {unknown}. Valid targets: {DEFAULT_TARGETS}.")
        if self.init not in ('default', 'random'):
            raise LoRAConfigError(f"lora.init must be 'default' or 'random', got {self.init!r}.")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)


def _transformer_module_names(model: nn.Module) -> tp.List[str]:
    return [name for name, _ in model.named_modules() if name.startswith('transformer.layers.')]


def has_cross_attention(model: nn.Module) -> bool:
    return any(name.endswith('.cross_attention') for name in _transformer_module_names(model))


def resolve_targets(model: nn.Module, settings: LoRASettings) -> tp.List[str]:
    """Return the targets that apply to `model`, raising on targets that match nothing."""
    module_names = _transformer_module_names(model)
    param_names = [n for n, _ in model.named_parameters() if n.startswith('transformer.layers.')]
    cross = has_cross_attention(model)
    resolved = []
    for target in settings.targets:
        if target in _CROSS_TARGETS and not cross:
            logger.info("Base has no cross-attention (e.g. melody): skipping LoRA target %s.", target)
            continue
        kind, suffix = TARGETS[target]
        names = param_names if kind == 'param' else module_names
        if not any(n.endswith('.' + suffix) for n in names):
            existing = sorted({re.sub(r'^transformer\.layers\.\d+\.', '', n) for n in module_names if n})
            raise LoRAConfigError(
                f"LoRA target {target!r} matches nothing in this base model (looked for '*.{suffix}'). "
                f"Modules that exist in each layer: {existing}. If the base uses torch's nn.MultiheadAttention "
                "(transformer_lm.memory_efficient=false and custom=false) it has no in_proj_weight to adapt.")
        resolved.append(target)
    if not resolved:
        raise LoRAConfigError(f"No LoRA target applies to this base (asked for {settings.targets}).")
    return resolved


def inject_lora(model: nn.Module, settings: LoRASettings, fast_path: bool = True) -> tp.List[str]:
    """Inject LoRA into `model` in place (base weights must already be loaded), freeze everything else.

    Args:
        fast_path: use `fast_lora` (low-rank products in one autograd node, no frozen-weight gradient, fused q/k/v
            LoRA without a parametrization). False: peft's own forward, and peft's `target_parameters` for the
            fused q/k/v. Same canonical adapter names and same results either way.
    Returns:
        list of str: the targets actually used.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    settings.validate()
    targets = resolve_targets(model, settings)
    module_suffixes = [TARGETS[t][1] for t in targets if TARGETS[t][0] == 'module']
    param_suffixes = [TARGETS[t][1] for t in targets if TARGETS[t][0] == 'param']
    fused_suffixes: tp.List[str] = []
    if fast_path:
        fused_suffixes, param_suffixes = param_suffixes, []
    if module_suffixes or param_suffixes:
        config = LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, use_rslora=settings.use_rslora,
            target_modules=(r'^transformer\.layers\.\d+\.(' + '|'.join(re.escape(s) for s in module_suffixes)
                            + r')$' if module_suffixes else []),
            target_parameters=param_suffixes or None,
            init_lora_weights=True, bias='none')
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft refuses dropout as soon as target_parameters is used: give it to the nn.Linear targets only.
    if settings.dropout > 0:
        for module in model.modules():
            if isinstance(module, LoraLinear) and ADAPTER_NAME in module.lora_dropout:
                module.lora_dropout[ADAPTER_NAME] = nn.Dropout(p=settings.dropout)
    if fast_path:
        from . import fast_lora, fused_in_proj
        fast_lora.enable_fast_linear(model)
        for name, module in list(model.named_modules()):
            if name.startswith('transformer.layers.') and any(
                    (name + '.in_proj_weight').endswith('.' + s) for s in fused_suffixes):
                fused_in_proj.inject_fused_in_proj(module, settings.rank, settings.scaling)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
    if settings.init == 'random':
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, param in sorted(lora_parameters(model).items()):  # same values with or without fast_path
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return targets


def is_lora_parameter(name: str) -> bool:
    return '.lora_A.' in name or '.lora_B.' in name


def canonical_name(peft_name: str) -> str:
    """`...self_attn.base_layer.out_proj.lora_A.default.weight` -> `...self_attn.out_proj.lora_A.weight`.

    A LoRA pair held by a ParamWrapper (`...self_attn.lora_A.default.weight`) adapts `in_proj_weight`:
    it becomes `...self_attn.in_proj.lora_A.weight`.
    """
    name = peft_name.replace('.base_layer', '').replace(f'.{ADAPTER_NAME}.', '.')
    name = re.sub(r'\.(self_attn|cross_attention)\.(lora_[AB])\.', r'.\1.in_proj.\2.', name)
    return name


def lora_parameters(model: nn.Module) -> tp.Dict[str, nn.Parameter]:
    """Adapter parameters of `model` under canonical names, in a stable order."""
    params = {}
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            key = canonical_name(name)
            assert key not in params, f"Two LoRA parameters map to {key}"
            params[key] = param
    return params


def base_weight_name(canonical: str) -> str:
    """Name, in the *un-injected* LM state dict, of the weight adapted by a canonical LoRA key's module."""
    module = re.sub(r'\.lora_[AB]\.weight$', '', canonical)
    if module.endswith('.in_proj'):
        return module[:-len('.in_proj')] + '.in_proj_weight'
    return module + '.weight'


def delta_weights(adapter: tp.Dict[str, torch.Tensor], scaling: float) -> tp.Dict[str, torch.Tensor]:
    """`{base weight name: scaling * B @ A}` for every adapted weight (computed in float32)."""
    modules = sorted({re.sub(r'\.lora_[AB]\.weight$', '', k) for k in adapter})
    deltas = {}
    for module in modules:
        a_key, b_key = f'{module}.lora_A.weight', f'{module}.lora_B.weight'
        if a_key not in adapter or b_key not in adapter:
            raise KeyError(f"Adapter is missing {a_key if a_key not in adapter else b_key}")
        a, b = adapter[a_key].float(), adapter[b_key].float()
        deltas[base_weight_name(a_key)] = scaling * (b @ a)
    return deltas


def merge_into_state_dict(base_state: tp.Dict[str, torch.Tensor], adapter: tp.Dict[str, torch.Tensor],
                          scaling: float) -> tp.Dict[str, torch.Tensor]:
    """Pure function: the base LM state dict with every LoRA delta added (a new dict; inputs untouched).

    Raises:
        KeyError: naming the adapted weights that the base state dict doesn't have, or shape mismatches.
    """
    deltas = delta_weights(adapter, scaling)
    missing = [k for k in deltas if k not in base_state]
    if missing:
        raise KeyError(f"Adapter adapts weights that the base doesn't have: {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")
    merged = dict(base_state)
    for key, delta in deltas.items():
        weight = base_state[key]
        if weight.shape != delta.shape:
            raise KeyError(f"Shape mismatch for {key}: base {tuple(weight.shape)} vs adapter {tuple(delta.shape)}")
        merged[key] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    return merged


class AdapterParameters(nn.Module):
    """A module view on the LoRA parameters of a model, under canonical names.

    This is what the solver checkpoints, keeps as best state, averages in EMA and optimizes: its `state_dict`
    holds the adapter only, never a base weight.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._params = lora_parameters(model)
        if not self._params:
            raise LoRAConfigError("The model has no LoRA parameters: was inject_lora called?")

    def named_parameters(self, prefix: str = '', recurse: bool = True, remove_duplicate: bool = True):
        for name, param in self._params.items():
            yield prefix + name, param

    def named_buffers(self, prefix: str = '', recurse: bool = True, remove_duplicate: bool = True):
        return iter(())

    def state_dict(self, *args, **kwargs) -> tp.Dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: param.detach() for name, param in self._params.items()}

    def load_state_dict(self, state: tp.Mapping[str, torch.Tensor], strict: bool = True):  # type: ignore
        missing = [k for k in self._params if k not in state]
        unexpected = [k for k in state if k not in self._params]
        if strict and (missing or unexpected):
            raise KeyError(f"Adapter state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                           "Was it trained with other lora.targets or on another base?")
        with torch.no_grad():
            for name, value in state.items():
                if name in self._params:
                    param = self._params[name]
                    if param.shape != value.shape:
                        raise KeyError(f"Adapter tensor {name} has shape {tuple(value.shape)}, expected "
                                       f"{tuple(param.shape)}: different lora.rank or base model?")
                    param.copy_(value)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._params.values())
