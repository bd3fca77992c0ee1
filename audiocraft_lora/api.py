"""Python API: a base model (+ optional adapter) as a stock `audiocraft.models.MusicGen`.

    from audiocraft_lora import load_musicgen
    model = load_musicgen(adapter='outputs/xps/<sig>/adapter')        # base read from the adapter's config
    model.set_generation_params(duration=15, cfg_coef=3.0, top_k=250)
    wav = model.generate(['dark trap beat, 140 bpm'])                  # [B, C, T] at model.sample_rate

Everything AudioCraft users know works on the returned object (`generate`, `generate_continuation`,
`generate_unconditional`, `generate_with_chroma` for melody bases), because it *is* AudioCraft's class. By default
the adapter is merged into the base weights (one matmul per adapted weight at load time, then generation runs at
the base model's speed); `merge=False` keeps the LoRA modules instead (same outputs up to float rounding).

`model.audiocraft_lora` (a dict) records where the weights came from: base name and fingerprint, adapter folder,
whether it was merged. `generate` writes it into its settings json.
"""
from pathlib import Path
import typing as tp

import torch

from . import adapters, base_models
from .errors import UserError
from .lora import AdapterParameters, inject_lora, merge_into_state_dict

__all__ = ['load_musicgen', 'build_musicgen', 'load_base', 'with_adapter', 'load_base_and_adapter',
           'BaseAndAdapter', 'default_device']

# AudioCraft's get_pretrained builds MusicGen with this max_duration: longer requests use extend_stride windows.
MAX_DURATION = 30.0


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


class BaseAndAdapter(tp.NamedTuple):
    """A resolved base with its LM package and fingerprint, and optionally an adapter checked against it."""
    base: base_models.BaseModel
    lm_pkg: dict
    fingerprint: str
    adapter: tp.Optional[adapters.Adapter] = None
    adapter_dir: tp.Optional[Path] = None


def load_base(base: str) -> BaseAndAdapter:
    """Resolve a base and read its LM package once (reuse it with `with_adapter` for several adapters)."""
    resolved = base_models.resolve_base(base)
    lm_pkg = base_models.load_lm_package(resolved)
    return BaseAndAdapter(resolved, lm_pkg, base_models.fingerprint_state(lm_pkg['best_state']))


def with_adapter(pair: BaseAndAdapter, adapter_dir: tp.Union[str, Path], adapter: tp.Optional[adapters.Adapter] = None,
                 force_base_mismatch: bool = False) -> BaseAndAdapter:
    """`pair`'s base with the adapter of `adapter_dir` (read unless given), refused if trained on another base;
    `adapter_dir` as resolved (an XP signature, or outputs/xps/... from another folder: the real folder)."""
    folder = adapters.resolve_adapter_folder(adapter_dir, strict=False)
    adapter = adapter if adapter is not None else adapters.load_adapter(folder)
    if not force_base_mismatch:
        adapters.check_base_matches(adapter, pair.base.name, pair.fingerprint)
    return pair._replace(adapter=adapter, adapter_dir=folder)


def load_base_and_adapter(base: tp.Optional[str] = None, adapter: tp.Optional[tp.Union[str, Path]] = None,
                          force_base_mismatch: bool = False) -> BaseAndAdapter:
    """The base (default: the one recorded in the adapter) and the optional adapter, checked to match.

    Raises:
        UserError: no base and no adapter, adapter folder unusable or recording no base.
        BaseModelError: base not found, or not the base the adapter was trained on (unless forced).
    """
    if base is None and adapter is None:
        raise UserError("Give a base model (--base facebook/musicgen-small, a local folder, or debug) and/or an "
                        "adapter folder (--adapter outputs/xps/<sig>/adapter).")
    loaded = adapters.load_adapter(adapter) if adapter is not None else None
    base_name = base or (loaded.config.get('base_model') if loaded else None)
    if not base_name:
        raise UserError(f"{adapter}/{adapters.CONFIG_NAME} records no base_model: pass the base (--base).")
    pair = load_base(base_name)
    return with_adapter(pair, adapter, loaded, force_base_mismatch) if loaded is not None else pair


def load_musicgen(base: tp.Optional[str] = None, adapter: tp.Optional[tp.Union[str, Path]] = None,
                  device: tp.Optional[str] = None, merge: bool = True, force_base_mismatch: bool = False):
    """Build a stock `audiocraft.models.MusicGen` from a base and an optional adapter.

    Args:
        base (str, optional): hub id (local HF cache), local AudioCraft folder, local HF-transformers folder or
            `debug`. Defaults to the base recorded in the adapter's config.
        adapter (str or Path, optional): adapter folder (`outputs/xps/<sig>/adapter`, or one written by export).
        device (str, optional): 'cuda' when available, else 'cpu'.
        merge (bool): merge the adapter into the base weights (fast generation) or keep LoRA modules.
        force_base_mismatch (bool): apply the adapter even if its recorded base fingerprint differs.
    Raises:
        UserError: no base and no adapter; adapter folder unusable.
        BaseModelError: base not found, or not the base the adapter was trained on (unless forced).
    """
    return build_musicgen(load_base_and_adapter(base, adapter, force_base_mismatch), device, merge)


def build_musicgen(pair: BaseAndAdapter, device: tp.Optional[str] = None, merge: bool = True):
    """`load_musicgen` from an already loaded base (and adapter); `pair.lm_pkg` is left untouched."""
    from audiocraft.models import MusicGen
    device = device or default_device()
    from .config_checks import check_device
    check_device(device, option='--device')
    resolved, lm_pkg, loaded = pair.base, pair.lm_pkg, pair.adapter
    info: tp.Dict[str, tp.Any] = {'base_model': resolved.name, 'base_kind': resolved.kind,
                                  'base_fingerprint': pair.fingerprint, 'adapter': None, 'merged': False}
    if loaded is not None:
        info.update(adapter=str(Path(pair.adapter_dir).resolve()), adapter_fingerprint=_adapter_fingerprint(loaded),
                    lora=loaded.settings.to_dict(), merged=merge)
        if merge:
            try:
                merged = merge_into_state_dict(lm_pkg['best_state'], loaded.state, loaded.scaling)
            except KeyError as exc:
                raise UserError(f"Adapter {pair.adapter_dir} does not fit base {resolved.describe()}: {exc}") from exc
            lm_pkg = {**lm_pkg, 'best_state': merged}
    lm = base_models.build_lm(lm_pkg, device='cpu')
    if loaded is not None and not merge:
        inject_lora(lm, loaded.settings)
        try:
            AdapterParameters(lm).load_state_dict(loaded.state)
        except KeyError as exc:
            raise UserError(f"Adapter {pair.adapter_dir} does not fit base {resolved.describe()}: {exc}") from exc
    lm = lm.to(device).eval()
    compression_model = base_models.load_compression_model(resolved, device=device)
    if 'self_wav' in lm.condition_provider.conditioners:  # melody bases, as AudioCraft's get_pretrained does
        lm.condition_provider.conditioners['self_wav'].match_len_on_eval = True
        lm.condition_provider.conditioners['self_wav']._use_masking = False
    model = MusicGen(resolved.name, compression_model, lm, max_duration=MAX_DURATION)
    model.audiocraft_lora = info
    return model


def _adapter_fingerprint(adapter: adapters.Adapter) -> str:
    return base_models.fingerprint_state(adapter.state)
