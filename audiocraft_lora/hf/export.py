"""Export an adapter: HF PEFT folder, merged AudioCraft folder, merged HF transformers folder.

Every export first checks that the base given is the base the adapter was trained on (`adapters.check_base_matches`
on `base_models.fingerprint_state` of the AudioCraft LM state), unless `force=True`.

- `export_peft`: `adapter_config.json` + `adapter_model.safetensors` for `PeftModel.from_pretrained(
  MusicgenForConditionalGeneration.from_pretrained(hf_base), folder)` (mapping and proof in `hf.peft_map`).
- `merge_to_audiocraft`: `state_dict.bin` with the LoRA delta merged (`lora.merge_into_state_dict`) +
  the base's `compression_state_dict.bin` (+ `t5/` of converted bases): loads with stock `MusicGen.get_pretrained`.
- `merge_to_hf`: the HF base with merged decoder weights (`save_pretrained`) + its tokenizer/processor files; needs
  the base as an HF folder (or a folder converted by `import-hf`, whose source folder is used).
"""
import json
import logging
from pathlib import Path
import shutil
import tempfile
import typing as tp

import torch

from ..api import BaseAndAdapter, load_base_and_adapter
from ..base_models import BaseModel, lm_config
from ..checkpoint_io import atomic_torch_save, atomic_write_text
from ..errors import BaseModelError, UserError
from ..lora import merge_into_state_dict
from . import lm_map, peft_map

logger = logging.getLogger(__name__)

__all__ = ['load_adapter_and_base', 'export_peft', 'merge_to_audiocraft', 'merge_to_hf',
           'hf_source_folder']
_HF_SIDE_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'spiece.model',
                  'added_tokens.json', 'preprocessor_config.json', 'processor_config.json', 'generation_config.json')


def load_adapter_and_base(adapter_dir: tp.Union[str, Path], base: tp.Optional[str] = None,
                          force: bool = False) -> BaseAndAdapter:
    """Read an adapter and its base (the one recorded in the adapter unless `base` is given) and check they match
    (`api.load_base_and_adapter`): `.adapter`, `.base`, `.lm_pkg`.
    """
    return load_base_and_adapter(base, adapter_dir, force)


def hf_source_folder(base: BaseModel) -> tp.Optional[Path]:
    """The HF transformers folder of a base: the folder itself, or the source recorded by `import-hf`."""
    if base.kind == 'hf_dir':
        return Path(base.name).expanduser()
    manifest = Path(base.path) / 'hf_import.json'
    if manifest.exists():
        source = json.loads(manifest.read_text()).get('source')
        if source and (Path(source) / 'config.json').exists():
            return Path(source)
    return None


def _fresh_dir(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty: choose a new --out folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> Path:
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked by _fresh_dir)
    tmp.replace(out_dir)
    return out_dir


PROVENANCE_NAME = 'audiocraft_lora_adapter.json'  # beside a PEFT export: where the adapter came from
_PROVENANCE_KEYS = ('xp_sig', 'epoch', 'last_epoch', 'selected_by', 'base_model', 'base_fingerprint')


def provenance(pair: BaseAndAdapter) -> tp.Dict[str, tp.Any]:
    """What an exported or merged folder records of its adapter: the folder, the XP and the epoch its weights are
    from (best valid or last: `selected_by`), the base and the scaling."""
    config = pair.adapter.config
    return {'adapter': str(Path(pair.adapter_dir).resolve()), 'scaling': pair.adapter.scaling,
            **{key: config[key] for key in _PROVENANCE_KEYS if key in config}}


def export_peft(adapter_dir: tp.Union[str, Path], out_dir: tp.Union[str, Path], base: tp.Optional[str] = None,
                force: bool = False) -> Path:
    """Write a Hugging Face PEFT adapter folder for the adapter (see `hf.peft_map`)."""
    pair = load_adapter_and_base(adapter_dir, base, force)
    settings = pair.adapter.settings
    hf_dir = hf_source_folder(pair.base)
    out_dir = Path(out_dir)
    tmp = _fresh_dir(out_dir)
    try:
        peft_map.write_peft_adapter(tmp, pair.adapter.state, settings.rank, settings.alpha, settings.dropout,
                                    settings.use_rslora, str(hf_dir.resolve()) if hf_dir else pair.base.name)
        atomic_write_text(json.dumps(provenance(pair), indent=2, sort_keys=True) + '\n',
                          tmp / PROVENANCE_NAME)  # (PEFT's own config keeps PEFT's keys only)
        return _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merged_state(pair: BaseAndAdapter) -> tp.Dict[str, torch.Tensor]:
    try:
        return merge_into_state_dict(pair.lm_pkg['best_state'], pair.adapter.state, pair.adapter.scaling)
    except KeyError as exc:
        raise BaseModelError(f"Can't merge the adapter into {pair.base.describe()}: {exc}") from exc


def merge_to_audiocraft(adapter_dir: tp.Union[str, Path], out_dir: tp.Union[str, Path],
                        base: tp.Optional[str] = None, force: bool = False) -> Path:
    """Write an AudioCraft folder with the adapter merged, loadable by stock `MusicGen.get_pretrained`."""
    from audiocraft.models import loaders
    from omegaconf import OmegaConf
    pair = load_adapter_and_base(adapter_dir, base, force)
    merged = _merged_state(pair)
    cfg = pair.lm_pkg['xp.cfg']
    pkg = {k: v for k, v in pair.lm_pkg.items() if k not in ('best_state', 'xp.cfg')}
    pkg['xp.cfg'] = cfg if isinstance(cfg, str) else OmegaConf.to_yaml(lm_config(pair.lm_pkg))
    pkg['best_state'] = merged
    pkg['merged_adapter'] = json.dumps({**provenance(pair), 'base': pair.base.name})
    out_dir = Path(out_dir)
    tmp = _fresh_dir(out_dir)
    try:
        src = Path(pair.base.path)
        if (src / 'compression_state_dict.bin').exists():
            shutil.copy2(src / 'compression_state_dict.bin', tmp / 'compression_state_dict.bin')
        else:  # hub id: the package comes from the local HF cache
            atomic_torch_save(loaders.load_compression_model_ckpt(pair.base.path), tmp / 'compression_state_dict.bin')
        if (src / 'hf_import.json').exists():  # converted base: keep its T5 so the folder can re-register it
            manifest = json.loads((src / 'hf_import.json').read_text())
            shutil.copytree(src / manifest.get('t5_dir', 't5'), tmp / manifest.get('t5_dir', 't5'))
            # its weights are no longer those of the HF source folder: keep only what T5 registration needs
            manifest.update(source=None, merged_from=pair.base.name,
                            merged_adapter=str(Path(pair.adapter_dir).resolve()))
            atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True) + '\n', tmp / 'hf_import.json')
        atomic_torch_save(pkg, tmp / 'state_dict.bin')
        return _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_to_hf(adapter_dir: tp.Union[str, Path], out_dir: tp.Union[str, Path], base: tp.Optional[str] = None,
                force: bool = False) -> Path:
    """Write an HF transformers MusicGen folder (`save_pretrained`) with the adapter merged into the decoder."""
    from ..hf_convert import load_hf_musicgen
    pair = load_adapter_and_base(adapter_dir, base, force)
    hf_dir = hf_source_folder(pair.base)
    if hf_dir is None:
        raise UserError(f"A merged Hugging Face folder needs the base as a Hugging Face transformers folder; "
                        f"{pair.base.describe()} is not one. Use --format merged-audiocraft, or pass --base with the "
                        "HF folder the AudioCraft base was converted from.")
    hf = load_hf_musicgen(hf_dir)
    dec = hf.model.config.decoder
    shape = (dec.num_hidden_layers, dec.num_codebooks, not hf.melody)
    base_state = pair.lm_pkg['best_state']
    current = lm_map.hf_to_audiocraft_decoder(hf.model.state_dict(), *shape)
    changed = [k for k, v in current.items() if k not in base_state or not torch.equal(v, base_state[k])]
    if changed:
        raise BaseModelError(f"{hf_dir} doesn't hold the weights of the base {pair.base.describe()} (first "
                             f"differences: {changed[:3]}); was the HF folder changed after conversion?")
    updates = lm_map.audiocraft_to_hf_decoder(_merged_state(pair), *shape)
    missing, unexpected = hf.model.load_state_dict(updates, strict=False)
    if unexpected:
        raise BaseModelError(f"Merged weights without a place in {hf_dir}'s model: {unexpected[:5]}")
    out_dir = Path(out_dir)
    tmp = _fresh_dir(out_dir)
    try:
        hf.model.save_pretrained(str(tmp), safe_serialization=True)
        for name in _HF_SIDE_FILES:
            if (hf_dir / name).exists() and not (tmp / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
        atomic_write_text(json.dumps({**provenance(pair), 'base': str(hf_dir.resolve())}, indent=2,
                                     sort_keys=True) + '\n', tmp / 'merged_adapter.json')
        return _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
