"""Adapter folders: `adapter_model.safetensors` + `adapter_config.json`.

An adapter folder is what training exports and what `audiocraft-lora generate/merge/export` read::

    adapter/
      adapter_model.safetensors   LoRA tensors under canonical names (see `audiocraft_lora.lora`), float32
      adapter_config.json         {"format": "audiocraft-lora", "format_version": 1, "lora": {...LoRASettings},
                                   "targets": [...used targets], "scaling": alpha/rank,
                                   "base_model": "<hub id or absolute folder>", "base_fingerprint": "<sha256>",
                                   "base_kind": "hub|audiocraft_dir|hf_dir|debug", ...extra}

The json is written with sorted keys. Loading ignores unknown keys (forward compatible). Applying an adapter to a
base whose fingerprint differs is refused with a message naming both bases.
"""
import json
from pathlib import Path
import typing as tp

import torch

from .checkpoint_io import atomic_write, atomic_write_text
from .errors import BaseModelError, UserError
from .lora import LoRASettings

WEIGHTS_NAME = 'adapter_model.safetensors'
CONFIG_NAME = 'adapter_config.json'
FORMAT = 'audiocraft-lora'
FORMAT_VERSION = 1


class Adapter(tp.NamedTuple):
    state: tp.Dict[str, torch.Tensor]
    settings: LoRASettings
    config: tp.Dict[str, tp.Any]

    @property
    def base_fingerprint(self) -> tp.Optional[str]:
        return self.config.get('base_fingerprint')

    @property
    def scaling(self) -> float:
        return float(self.config.get('scaling', self.settings.scaling))


def save_adapter(folder: tp.Union[str, Path], state: tp.Dict[str, torch.Tensor], settings: LoRASettings,
                 targets: tp.Sequence[str], base_model: str, base_fingerprint: str, base_kind: str = '',
                 extra: tp.Optional[dict] = None) -> Path:
    """Write an adapter folder (each file atomically)."""
    from safetensors.torch import save as safetensors_save
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to('cpu', torch.float32).contiguous() for k, v in state.items()}
    config = {
        'format': FORMAT, 'format_version': FORMAT_VERSION,
        'lora': settings.to_dict(), 'targets': list(targets), 'scaling': settings.scaling,
        'base_model': str(base_model), 'base_fingerprint': base_fingerprint, 'base_kind': base_kind,
        **(extra or {}),
    }
    with atomic_write(folder / WEIGHTS_NAME) as f:
        f.write(safetensors_save(tensors, metadata={'format': 'pt'}))
    atomic_write_text(json.dumps(config, indent=2, sort_keys=True) + '\n', folder / CONFIG_NAME)
    return folder


def load_adapter(folder: tp.Union[str, Path]) -> Adapter:
    """Read an adapter folder written by `save_adapter`.

    Raises:
        UserError: if the folder or one of its files is missing or isn't an audiocraft-lora adapter.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = resolve_adapter_folder(folder)
    config, weights_path = read_config(folder), folder / WEIGHTS_NAME
    settings = LoRASettings.from_config(config.get('lora', {}))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path} can't be read as safetensors ({exc}): the file is truncated or damaged. "
                        "Copy it again, or write it again from its XP's checkpoint (the training command with "
                        "`execute_only=export execute_inplace=true` added).") from exc
    return Adapter(state=state, settings=settings, config=config)


def read_config(folder: Path) -> tp.Dict[str, tp.Any]:
    """The adapter_config.json of an adapter folder (both files present), checked to be ours."""
    config_path = folder / CONFIG_NAME
    for path in (config_path, folder / WEIGHTS_NAME):
        if not path.exists():
            raise UserError(f"{path} is missing: {folder} is not an audiocraft-lora adapter folder.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}).") from exc
    if config.get('format') != FORMAT:
        hint = (" It looks like a Hugging Face PEFT adapter: use it with transformers + peft."
                if 'peft_type' in config else '')
        raise UserError(f"{config_path} is not an audiocraft-lora adapter config "
                        f"(format={config.get('format')!r}).{hint}")
    return config


def describe_adapter(folder: tp.Union[str, Path]) -> str:
    """Which XP and epoch an adapter's weights are from, as its config records it (exports and merges copy it)."""
    config = read_config(resolve_adapter_folder(folder))
    if 'epoch' not in config:
        return f"Adapter {folder}: no epoch recorded (not exported by a training run)."
    return (f"Adapter {folder}: XP {config.get('xp_sig', '?')}, epoch {config['epoch']} of "
            f"{config.get('last_epoch', '?')} ({config.get('selected_by', '?')}).")


def resolve_adapter_folder(given: tp.Union[str, Path], strict: bool = True) -> Path:
    """The adapter folder `given` names: a folder, or an XP's signature (`9a366928`), or `outputs/xps/<sig>/adapter`
    as the README writes it when `outputs/` is not under the current folder but the training runs' folder (dora's,
    `<checkout>/outputs` unless AUDIOCRAFT_LORA_DORA_DIR says otherwise).

    Raises:
        UserError: naming where XPs are, when none of these exists (`strict`; otherwise `given` is returned)."""
    from .checkout import dora_dir
    folder = Path(given)
    if folder.is_dir():
        return folder
    runs = dora_dir()
    parts = folder.parts
    candidates = []
    if len(parts) == 1:  # an XP signature
        candidates.append(runs / 'xps' / parts[0] / 'adapter')
    if 'xps' in parts:  # .../xps/<sig>/adapter written relative to another folder
        candidates.append(runs / Path(*parts[parts.index('xps'):]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if not strict:
        return folder
    xps = runs / 'xps'
    trained = sorted(p.parent.name for p in xps.glob('*/adapter')) if xps.is_dir() else []
    listing = (f" XPs with an adapter there: {', '.join(trained[-10:])}." if trained
               else " No XP there has an adapter yet (a run writes it when it ends; `execute_only=export` writes it "
               "from an unfinished XP's checkpoint).")
    raise UserError(f"Adapter folder {folder} does not exist. Training runs are in {xps} (not under the current "
                    f"folder): give `--adapter {xps}/<sig>/adapter`, or just the XP's signature `<sig>`, or a folder "
                    f"written by `audiocraft-lora export`.{listing}")


def check_base_matches(adapter: Adapter, base_name: str, base_fingerprint: str) -> None:
    """Refuse to apply an adapter to a base it wasn't trained on."""
    expected = adapter.base_fingerprint
    if expected and expected != base_fingerprint:
        raise BaseModelError(
            f"This adapter was trained on base {adapter.config.get('base_model')!r} (fingerprint {expected[:12]}), "
            f"but the base given is {base_name!r} (fingerprint {base_fingerprint[:12]}). Use the base the adapter "
            "was trained on, or pass --force-base-mismatch if you really mean it.")
