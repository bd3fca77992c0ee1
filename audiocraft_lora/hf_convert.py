"""Hugging Face transformers MusicGen folder -> AudioCraft MusicGen folder (and back, for the LM weights).

`import_hf(hf_dir, out_dir)` writes a folder that stock `audiocraft.models.MusicGen.get_pretrained(out_dir)` loads
with the hub unreachable (`HF_HUB_OFFLINE=1`), no `audiocraft_lora` import needed::

    out_dir/
      state_dict.bin              {'xp.cfg': yaml str, 'best_state': LM state dict, 'version', 'source'}
      compression_state_dict.bin  {'xp.cfg': yaml str, 'best_state': SEANet + RVQ EnCodec state dict}
      t5/                         the folder's T5 encoder + tokenizer (`save_pretrained`), see `hf.t5_local`
      hf_import.json              what was converted from where, and the T5 name it is registered under

- LM: `hf.lm_map` (q/k/v fused into `in_proj_weight`, `enc_to_dec_proj` -> the T5 conditioner's `output_proj`,
  identity when HF has none; config from the HF config: dims, heads, layers, ffn, card, n_q, delays, stereo
  interleaving, CFG coef from `generation_config.guidance_scale`, training CFG dropout 0.3 as MusicGen was trained).
- EnCodec: `hf.encodec_map` (same layers, HF's 'reflect' padding kept so codes are identical).
- T5: `hf.t5_local` (registered in the hub cache under a name AudioCraft's T5Conditioner accepts).

Melody models (`musicgen_melody`) convert too (chroma projection -> `self_wav` conditioner's `output_proj`,
prepend fuser), but stock AudioCraft builds their `ChromaStemConditioner` with demucs' `htdemucs` (hub download,
`demucs` package): loading them needs both.

`ensure_converted(hf_dir)` does the same once into the cache (keyed by the folder path, config and weight files).
The export side (`export_peft`, `merge_to_audiocraft`, `merge_to_hf`) lives in `audiocraft_lora.hf.export` and is
re-exported here.
"""
import hashlib
import json
import logging
import os
from pathlib import Path
import shutil
import tempfile
import typing as tp

import torch

from .checkpoint_io import atomic_torch_save, atomic_write_text
from .errors import BaseModelError
from .hf import encodec_map, lm_map, t5_local
from .hf.export import export_peft, merge_to_audiocraft, merge_to_hf  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 2  # 2: melody folders carry the chroma extractor's window buffer
MANIFEST_NAME = 'hf_import.json'
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.json', '.model')


class HFMusicGen(tp.NamedTuple):
    """A loaded HF MusicGen folder."""
    model: tp.Any  # MusicgenForConditionalGeneration | MusicgenMelodyForConditionalGeneration
    raw_config: tp.Dict[str, tp.Any]  # config.json as saved
    melody: bool


def read_hf_config(hf_dir: tp.Union[str, Path]) -> tp.Dict[str, tp.Any]:
    """config.json of an HF MusicGen folder. Raises `BaseModelError` naming the file if it isn't one."""
    path = Path(hf_dir) / 'config.json'
    if not path.exists():
        raise BaseModelError(f"{hf_dir} has no config.json: not a Hugging Face transformers folder. Give the folder "
                             "written by MusicgenForConditionalGeneration.save_pretrained (e.g. local/musicgen-small).")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"Can't read {path}: {exc}") from exc
    model_type = raw.get('model_type')
    if model_type not in ('musicgen', 'musicgen_melody'):
        raise BaseModelError(f"{path} has model_type={model_type!r}; expected 'musicgen' or 'musicgen_melody' "
                             "(a MusicGen saved with transformers' save_pretrained).")
    missing = [key for key in ('decoder', 'audio_encoder', 'text_encoder') if not isinstance(raw.get(key), dict)]
    if missing:
        raise BaseModelError(f"{path} has no {', '.join(missing)} section(s): it is incomplete, not the config.json "
                             "that save_pretrained writes for a MusicGen. Copy the model folder again (config.json "
                             "with its weights).")
    return raw


def load_hf_musicgen(hf_dir: tp.Union[str, Path]) -> HFMusicGen:
    """Load the HF MusicGen of a local folder in float32, eval mode, never touching the hub."""
    raw = read_hf_config(hf_dir)
    melody = raw['model_type'] == 'musicgen_melody'
    if melody:
        from transformers import MusicgenMelodyForConditionalGeneration as cls
    else:
        from transformers import MusicgenForConditionalGeneration as cls  # type: ignore[no-redef]
    from safetensors import SafetensorError
    try:
        model = cls.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
    except SafetensorError as exc:
        raise BaseModelError(f"The weights in {hf_dir} can't be read ({exc}): a safetensors file there is truncated "
                             "or damaged. Copy the model folder again.") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise BaseModelError(f"transformers can't load {hf_dir} as {cls.__name__}: {exc}") from exc
    return HFMusicGen(model.eval(), raw, melody)


def _melody_settings(hf_dir: Path, hf: HFMusicGen, sample_rate: int) -> tp.Dict[str, tp.Any]:
    n_fft = 16384
    pre = hf_dir / 'preprocessor_config.json'
    if pre.exists():
        n_fft = int(json.loads(pre.read_text()).get('n_fft', n_fft))
    return {'sample_rate': sample_rate, 'n_chroma': int(hf.model.config.num_chroma),
            'radix2_exp': int(n_fft).bit_length() - 1, 'argmax': True, 'match_len_on_eval': False,
            'eval_wavs': None, 'n_eval_wavs': 0, 'cache_path': None}


def convert(hf_dir: tp.Union[str, Path]) -> tp.Tuple[dict, dict, HFMusicGen, str]:
    """Build AudioCraft's `(state_dict.bin, compression_state_dict.bin)` packages from an HF MusicGen folder.

    Returns:
        tuple: (lm_pkg, compression_pkg, the loaded HF model, the T5Conditioner name chosen for its text encoder).
    """
    from audiocraft.models import builders
    from omegaconf import OmegaConf
    hf_dir = Path(hf_dir)
    hf = load_hf_musicgen(hf_dir)
    config = hf.model.config
    dec, enc, text = config.decoder, config.audio_encoder, config.text_encoder
    state = hf.model.state_dict()
    t5_name = t5_local.choose_name(hf.raw_config.get('text_encoder', {}))
    sample_rate = int(enc.sampling_rate)
    guidance = getattr(hf.model.generation_config, 'guidance_scale', None) or 3.0
    melody = _melody_settings(hf_dir, hf, sample_rate) if hf.melody else None
    if int(getattr(dec, 'bos_token_id', dec.vocab_size) or dec.vocab_size) != dec.vocab_size:
        logger.warning("HF decoder bos_token_id=%s differs from vocab_size=%s; AudioCraft always uses card=%s as "
                       "its special (start/pad) token.", dec.bos_token_id, dec.vocab_size, dec.vocab_size)
    lm_cfg = lm_map.lm_config(dec, sample_rate, t5_name, float(guidance), melody)

    lm_state = lm_map.hf_to_audiocraft_decoder(state, dec.num_hidden_layers, dec.num_codebooks,
                                               cross_attention=not hf.melody)
    prefix = 'condition_provider.conditioners.'
    weight, bias = lm_map.projection(state, 'enc_to_dec_proj', text.d_model, dec.hidden_size)
    lm_state[prefix + 'description.output_proj.weight'] = weight
    lm_state[prefix + 'description.output_proj.bias'] = bias
    if hf.melody:
        weight, bias = lm_map.projection(state, 'audio_enc_to_dec_proj', config.num_chroma, dec.hidden_size)
        lm_state[prefix + 'self_wav.output_proj.weight'], lm_state[prefix + 'self_wav.output_proj.bias'] = weight, bias
        # the chroma extractor's STFT window is a buffer of AudioCraft's checkpoints (HF computes it on the fly)
        from audiocraft.modules.chroma import ChromaExtractor
        extractor = ChromaExtractor(sample_rate=melody['sample_rate'], n_chroma=melody['n_chroma'],
                                    radix2_exp=melody['radix2_exp'], argmax=melody['argmax'])
        for key, value in extractor.state_dict().items():
            lm_state[prefix + 'self_wav.chroma.' + key] = value

    n_q = encodec_map.num_quantizers_for_lm(dec.num_codebooks, dec.audio_channels)
    comp_cfg = encodec_map.compression_config(enc, n_q)
    if n_q > len(hf.model.audio_encoder.quantizer.layers):
        raise BaseModelError(f"The decoder models {n_q} codebooks per channel but the audio encoder only has "
                             f"{len(hf.model.audio_encoder.quantizer.layers)} quantizers.")
    if dec.vocab_size != enc.codebook_size:
        raise BaseModelError(f"decoder vocab_size={dec.vocab_size} != audio_encoder codebook_size="
                             f"{enc.codebook_size} in {hf_dir / 'config.json'}.")
    with torch.random.fork_rng():  # building draws random init weights: don't disturb the caller's RNG
        target_keys = builders.get_compression_model(OmegaConf.create(comp_cfg)).state_dict().keys()
    comp_state = encodec_map.hf_to_audiocraft_encodec(hf.model.audio_encoder.state_dict(), target_keys, n_q)
    source = {'hf_dir': str(hf_dir.resolve()), 'converter_version': CONVERTER_VERSION}
    lm_pkg = {'xp.cfg': OmegaConf.to_yaml(OmegaConf.create(lm_cfg)), 'best_state': lm_state,
              'version': CONVERTER_VERSION, 'source': json.dumps(source)}
    comp_pkg = {'xp.cfg': OmegaConf.to_yaml(OmegaConf.create(comp_cfg)), 'best_state': comp_state,
                'version': CONVERTER_VERSION, 'source': json.dumps(source)}
    return lm_pkg, comp_pkg, hf, t5_name


def _write_folder(hf_dir: Path, folder: Path) -> str:
    """Write a converted folder into the (new, empty) `folder`. Returns the T5 name."""
    raw = read_hf_config(hf_dir)
    text_cfg = raw.get('text_encoder', {})
    t5_name = t5_local.choose_name(text_cfg)
    tokenizer = t5_local.load_tokenizer(hf_dir, t5_name, int(text_cfg.get('vocab_size', 0)))  # fail fast
    lm_pkg, comp_pkg, hf, _ = convert(hf_dir)
    t5_dir = t5_local.save_t5(hf.model.text_encoder, tokenizer, folder)
    atomic_torch_save(comp_pkg, folder / 'compression_state_dict.bin')
    atomic_torch_save(lm_pkg, folder / 'state_dict.bin')
    manifest = {'source': str(hf_dir.resolve()), 'model_type': hf.raw_config['model_type'],
                'converter_version': CONVERTER_VERSION, 't5_name': t5_name, 't5_dir': t5_local.T5_SUBDIR,
                't5_digest': t5_local.digest_folder(t5_dir),
                'note': "Stock AudioCraft loads T5 by name from the Hugging Face cache: run `audiocraft-lora "
                        "import-hf <this folder>` once per machine to register t5/ there, and load with "
                        "HF_HUB_OFFLINE=1."}
    atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True) + '\n', folder / MANIFEST_NAME)
    return t5_name


def register_t5(folder: tp.Union[str, Path], hub_cache: tp.Optional[tp.Union[str, Path]] = None) -> Path:
    """(Re-)register the `t5/` of a converted folder in the hub cache (see `hf.t5_local`). Returns the snapshot."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.exists():
        raise BaseModelError(f"{folder} has no {MANIFEST_NAME}: it wasn't written by `audiocraft-lora import-hf`.")
    manifest = json.loads(manifest_path.read_text())
    return t5_local.register_in_hub_cache(folder / manifest.get('t5_dir', t5_local.T5_SUBDIR), manifest['t5_name'],
                                          hub_cache, digest=manifest.get('t5_digest'))


def is_converted_folder(folder: tp.Union[str, Path]) -> bool:
    return (Path(folder) / MANIFEST_NAME).exists() and (Path(folder) / 'state_dict.bin').exists()


def import_hf(hf_dir: tp.Union[str, Path], out_dir: tp.Union[str, Path], register: bool = True,
              hub_cache: tp.Optional[tp.Union[str, Path]] = None) -> Path:
    """Convert an HF MusicGen folder to an AudioCraft folder at `out_dir` (what `audiocraft-lora import-hf` runs).

    Args:
        hf_dir: folder saved by `MusicgenForConditionalGeneration.save_pretrained` (+ tokenizer files).
        out_dir: new folder, or one previously written by `import_hf` (replaced).
        register: register the folder's T5 in the hub cache so stock AudioCraft finds it offline.
        hub_cache: hub cache to register in (default: the one transformers uses, `HF_HUB_CACHE`).
    Raises:
        BaseModelError: not an HF MusicGen, unsupported settings, or `out_dir` holds something else.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    read_hf_config(hf_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not is_converted_folder(out_dir):
        raise BaseModelError(f"{out_dir} exists and is not a folder written by import-hf: choose an empty or new "
                             "--out folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        _write_folder(hf_dir, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if register:
        register_t5(out_dir, hub_cache)
    return out_dir


def _cache_key(hf_dir: Path) -> str:
    hasher = hashlib.sha256(f'v{CONVERTER_VERSION}:{hf_dir.resolve()}'.encode())
    hasher.update((hf_dir / 'config.json').read_bytes())
    for path in sorted(hf_dir.iterdir()):
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
            stat = path.stat()
            hasher.update(f'{path.name}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    return hasher.hexdigest()[:16]


def ensure_converted(hf_dir: tp.Union[str, Path], cache_dir: tp.Optional[Path] = None) -> Path:
    """The AudioCraft folder of an HF MusicGen folder, converted once and cached (T5 registered every call).

    The cache entry is `<cache_dir or default_cache_dir()>/hf-converted/<name>-<hash>`, the hash covering the folder
    path, config.json and the size/mtime of its weight and tokenizer files; a changed folder converts again.
    """
    from .debug_base import default_cache_dir
    hf_dir = Path(hf_dir)
    read_hf_config(hf_dir)
    root = Path(cache_dir or default_cache_dir()) / 'hf-converted'
    folder = root / f'{hf_dir.resolve().name}-{_cache_key(hf_dir)}'
    if not is_converted_folder(folder):
        logger.info("Converting the Hugging Face MusicGen %s to AudioCraft's format in %s", hf_dir, folder)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.tmp-', dir=root))
        try:
            _write_folder(hf_dir, tmp)
            try:
                os.rename(tmp, folder)  # atomic; fails if a concurrent conversion won the race
            except OSError:
                if not is_converted_folder(folder):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    register_t5(folder)
    return folder
