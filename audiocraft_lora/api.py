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

__all__ = ['load_musicgen', 'default_device']

# AudioCraft's get_pretrained builds MusicGen with this max_duration: longer requests use extend_stride windows.
MAX_DURATION = 30.0


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


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
    from audiocraft.models import MusicGen
    device = device or default_device()
    if base is None and adapter is None:
        raise UserError("Give a base model (--base facebook/musicgen-small, a local folder, or debug) and/or an "
                        "adapter folder (--adapter outputs/xps/<sig>/adapter).")
    loaded = adapters.load_adapter(adapter) if adapter is not None else None
    base_name = base or (loaded.config.get('base_model') if loaded else None)
    if not base_name:
        raise UserError(f"{adapter}/{adapters.CONFIG_NAME} records no base_model: pass the base explicitly.")
    resolved = base_models.resolve_base(base_name)
    lm_pkg = base_models.load_lm_package(resolved)
    fingerprint = base_models.fingerprint_state(lm_pkg['best_state'])
    info: tp.Dict[str, tp.Any] = {'base_model': resolved.name, 'base_kind': resolved.kind,
                                  'base_fingerprint': fingerprint, 'adapter': None, 'merged': False}
    if loaded is not None:
        if not force_base_mismatch:
            adapters.check_base_matches(loaded, resolved.name, fingerprint)
        info.update(adapter=str(Path(adapter).resolve()), adapter_fingerprint=_adapter_fingerprint(loaded),
                    lora=loaded.settings.to_dict(), merged=merge)
        if merge:
            try:
                merged = merge_into_state_dict(lm_pkg['best_state'], loaded.state, loaded.scaling)
            except KeyError as exc:
                raise UserError(f"Adapter {adapter} does not fit base {resolved.describe()}: {exc}") from exc
            lm_pkg = {**lm_pkg, 'best_state': merged}
    lm = base_models.build_lm(lm_pkg, device='cpu')
    if loaded is not None and not merge:
        inject_lora(lm, loaded.settings)
        try:
            AdapterParameters(lm).load_state_dict(loaded.state)
        except KeyError as exc:
            raise UserError(f"Adapter {adapter} does not fit base {resolved.describe()}: {exc}") from exc
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
