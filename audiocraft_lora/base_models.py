"""Resolve and load a MusicGen base model: hub id | local AudioCraft folder | local HF-transformers folder | debug.

The architecture always comes from the checkpoint's own `xp.cfg` (never re-declared in yaml), and the weights are
loaded into the freshly built LM *before* any LoRA injection (peft renames the keys it wraps).

- `debug`: the tiny deterministic base of `audiocraft_lora.debug_base` (offline demo, tests).
- local AudioCraft folder: `state_dict.bin` + `compression_state_dict.bin` (what `MusicGen.get_pretrained` reads).
- local HF folder (`config.json` with `model_type: musicgen*`): converted once to an AudioCraft folder in the cache
  (see `audiocraft_lora.hf_convert`), then loaded as above.
- hub id (`facebook/musicgen-small`): AudioCraft's loaders through the local HF cache; `HF_HUB_OFFLINE=1` respected.
"""
from dataclasses import dataclass
import hashlib
import json
import logging
import os
from pathlib import Path
import re
import typing as tp

from omegaconf import DictConfig, OmegaConf
import torch

from .errors import BaseModelError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
# keys of the base's xp.cfg that define the LM and how it was trained/conditioned
ARCHITECTURE_KEYS = ('lm_model', 'transformer_lm', 'codebooks_pattern', 'conditioners', 'fuser',
                     'classifier_free_guidance', 'attribute_dropout', 'interleave_stereo_codebooks',
                     'compression_model_n_q')


@dataclass
class BaseModel:
    """Where a base model comes from. `path` is an AudioCraft folder, or the hub id for `kind == 'hub'`."""
    name: str
    kind: str  # 'debug' | 'audiocraft_dir' | 'hf_dir' | 'hub'
    path: str

    def describe(self) -> str:
        return f"{self.name} ({self.kind}{', ' + self.path if self.path != self.name else ''})"


def resolve_base(name: tp.Optional[str], cache_dir: tp.Optional[Path] = None) -> BaseModel:
    """Turn what the user wrote (`base_model=...`) into a loadable `BaseModel`, or raise a clear error."""
    if name is None or str(name).strip() in ('', '???'):
        raise BaseModelError("No base model given: set base_model=facebook/musicgen-small (hub id in the local HF "
                             "cache), base_model=/path/to/audiocraft/folder or base_model=/path/to/hf/musicgen.")
    name = str(name).strip()
    if name == 'debug':
        from .debug_base import ensure_debug_base
        return BaseModel(name, 'debug', str(ensure_debug_base(cache_dir)))
    path = launch_path(name)
    if path.exists():
        name = str(path)  # adapters and checkpoints record a folder that resolves from any working folder
        if path.is_file():
            raise BaseModelError(f"base_model={name} is a file; give the folder that holds state_dict.bin and "
                                 "compression_state_dict.bin (AudioCraft) or config.json (Hugging Face).")
        if (path / 'state_dict.bin').exists():
            if not (path / 'compression_state_dict.bin').exists():
                raise BaseModelError(f"{path} has state_dict.bin but no compression_state_dict.bin: an AudioCraft "
                                     "MusicGen folder needs both.")
            return BaseModel(name, 'audiocraft_dir', str(path.resolve()))
        if (path / 'config.json').exists():
            model_type = _hf_model_type(path / 'config.json')
            if model_type and model_type.startswith('musicgen'):
                from .hf_convert import ensure_converted  # noqa: local import, heavy
                converted = ensure_converted(path, cache_dir=cache_dir)
                return BaseModel(name, 'hf_dir', str(converted))
            raise BaseModelError(f"{path / 'config.json'} has model_type={model_type!r}; expected a MusicGen "
                                 "(musicgen / musicgen_melody) saved by transformers' save_pretrained.")
        raise BaseModelError(f"base_model={name} is a folder but holds neither state_dict.bin + "
                             "compression_state_dict.bin (AudioCraft) nor config.json (Hugging Face MusicGen).")
    if _HUB_ID.match(name) and not name.startswith(('.', '/', '~')):  # (launch_path(name) is no folder)
        return BaseModel(name, 'hub', name)
    raise BaseModelError(f"base_model={name} can't be found: no such folder, and it is not a hub id like "
                         "facebook/musicgen-small.")


def launch_path(name: str) -> Path:
    """`name` as an absolute path: a relative one is taken from the folder the command was launched from (under
    `dora run`, whose working folder is the XP's, the folder `dora run` was typed in)."""
    from dora import git_save
    return Path(git_save.to_absolute_path(os.path.expanduser(name)))


def _hf_model_type(config_path: Path) -> tp.Optional[str]:
    try:
        return json.loads(config_path.read_text()).get('model_type')
    except (OSError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"Can't read {config_path}: {exc}") from exc


def _load_package(base: BaseModel, filename: str) -> dict:
    from audiocraft.models import loaders
    try:
        if filename == 'state_dict.bin':
            return loaders.load_lm_model_ckpt(base.path)
        return loaders.load_compression_model_ckpt(base.path)
    except Exception as exc:  # hub/cache errors come in many types
        if base.kind != 'hub':
            if isinstance(exc, FileNotFoundError):
                raise BaseModelError(f"Base {base.describe()}: {filename} not found ({exc}).") from exc
            raise BaseModelError(f"Base {base.describe()}: can't read {filename}: {exc}") from exc
        offline = os.environ.get('HF_HUB_OFFLINE', '') not in ('', '0')
        raise BaseModelError(
            f"Base {base.name}: {filename} is not in the local Hugging Face cache"
            f"{' and HF_HUB_OFFLINE is set' if offline else ' and the hub is unreachable'} ({type(exc).__name__}). "
            "Download it once where the hub is reachable (huggingface-cli download "
            f"{base.name}), or point base_model to a local AudioCraft or HF-transformers folder (there is no folder "
            f"{launch_path(base.name)}; a relative path is taken from the folder the command was launched "
            "from).") from exc


def load_lm_package(base: BaseModel) -> dict:
    """AudioCraft's `state_dict.bin` package: {'xp.cfg': yaml/dict, 'best_state': LM state dict}."""
    pkg = _load_package(base, 'state_dict.bin')
    if 'xp.cfg' not in pkg or 'best_state' not in pkg:
        raise BaseModelError(f"Base {base.describe()}: state_dict.bin lacks 'xp.cfg' or 'best_state'; is it an "
                             "AudioCraft MusicGen export?")
    return pkg


def lm_config(lm_pkg: dict) -> DictConfig:
    cfg = OmegaConf.create(lm_pkg['xp.cfg'])
    assert isinstance(cfg, DictConfig)
    return cfg


def build_lm(lm_pkg: dict, device: str = 'cpu', overrides: tp.Optional[tp.Mapping] = None):
    """Build the LM from the package's own config, in float32, and load its weights (strict).

    `overrides` (the solver's `base_overrides`, e.g. `{'classifier_free_guidance': {'training_dropout': 0.2}}`) are
    merged into that config first, so the model the solver trains sees them too.
    """
    from audiocraft.models import builders
    cfg = lm_config(lm_pkg)
    OmegaConf.set_struct(cfg, False)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=True)
    cfg.device = str(device)
    cfg.dtype = 'float32'  # master weights; autocast handles mixed precision
    # keys that older/newer AudioCraft checkpoints carry and the builders don't accept (as AudioCraft's loader does)
    for path in ('conditioners.self_wav.chroma_stem.cache_path', 'conditioners.args.merge_text_conditions_p',
                 'conditioners.args.drop_desc_p'):
        *parents, leaf = path.split('.')
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, DictConfig) else None
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]
    check_melody_requirements(cfg)
    try:
        lm = builders.get_lm_model(cfg)
    except Exception as exc:
        if _uses_chroma_stem(cfg):
            raise BaseModelError(
                f"Building this melody base's chroma conditioner failed ({type(exc).__name__}: {exc}). It loads "
                f"demucs' htdemucs weights ({HTDEMUCS_WEIGHTS}) from the torch hub cache ($TORCH_HOME/hub/"
                "checkpoints, default ~/.cache/torch/hub/checkpoints): download them once where the internet is "
                "reachable (python -c \"from demucs.pretrained import get_model; get_model('htdemucs')\") and copy "
                "that file to this machine's cache.") from exc
        raise
    lm.load_state_dict(lm_pkg['best_state'])
    lm.cfg = cfg
    return lm


HTDEMUCS_WEIGHTS = '955717e8-8726e21a.th'


def _uses_chroma_stem(cfg: DictConfig) -> bool:
    conditioners = cfg.get('conditioners') or {}
    return any(isinstance(c, DictConfig) and c.get('model') == 'chroma_stem' for c in conditioners.values())


def check_melody_requirements(cfg: DictConfig) -> None:
    """Melody bases (chroma_stem conditioner) need the `demucs` package: say so before anything is built."""
    import importlib.util
    if _uses_chroma_stem(cfg) and importlib.util.find_spec('demucs') is None:
        raise BaseModelError(
            "This is a melody base: AudioCraft's chroma conditioner separates stems with demucs, which is not "
            "installed. Install it (pip install demucs==4.0.1 --no-deps, plus its dependencies dora-search, einops, "
            f"julius, lameenc, openunmix) and put the htdemucs weights ({HTDEMUCS_WEIGHTS}) in the torch hub cache "
            "($TORCH_HOME/hub/checkpoints) if this machine is offline. Text-only bases don't need it.")


def load_compression_model(base: BaseModel, device: str = 'cpu'):
    """The base's frozen compression model (EnCodec), in eval mode."""
    from audiocraft.models import loaders
    try:
        model = loaders.load_compression_model(base.path, device=device)
    except BaseModelError:
        raise
    except Exception as exc:
        _load_package(base, 'compression_state_dict.bin')  # raises the clear error if that's the cause
        raise BaseModelError(f"Base {base.describe()}: can't build its compression model: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fingerprint_state(state: tp.Mapping[str, torch.Tensor], samples_per_tensor: int = 4096) -> str:
    """A fast sha256 over names, shapes and a strided sample of each tensor's values.

    Cheap on multi-GB bases, and different for any two different checkpoints in practice.
    """
    hasher = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        hasher.update(f'{name}:{tuple(tensor.shape)}:'.encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            stride = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::stride][:samples_per_tensor].to('cpu', torch.float32).contiguous()
            hasher.update(sample.numpy().tobytes())
    return hasher.hexdigest()
