"""Make a MusicGen folder's own T5 text encoder loadable, offline, by AudioCraft's *stock* `T5Conditioner`.

AudioCraft's `T5Conditioner` accepts only a fixed list of names (t5-small/base/large/3b/11b, flan-t5-*), takes its
width from the name, and calls `T5Tokenizer.from_pretrained(name)` / `T5EncoderModel.from_pretrained(name)`. A
local path is not accepted, and with `finetune=False` (MusicGen) the T5 weights are not part of `state_dict.bin`.
So the only place where stock AudioCraft can find local T5 weights is the Hugging Face hub cache, under that name.

What we do (no edit of installed packages, no import of audiocraft_lora needed at load time):

1. the converted folder keeps the text encoder + tokenizer in `t5/` (`save_pretrained`), so it is self-contained;
2. `register_in_hub_cache` installs `t5/` as a snapshot of `models--<name>` in the hub cache (`HF_HUB_CACHE`,
   default `~/.cache/huggingface/hub`) with `refs/main` pointing at it, exactly the layout `hf_hub_download` reads
   with `HF_HUB_OFFLINE=1`. An existing cache entry for that name is never overwritten: if it holds the same
   encoder weights (the released MusicGens use the stock t5-base encoder) it is used as is; if it differs, the
   registration is refused with a message (the user decides which T5 the name should mean).

Consequences a user must know: load with `HF_HUB_OFFLINE=1` (otherwise transformers asks the hub for `<name>`'s
latest revision and, when it is reachable, downloads and uses the hub's weights, which are the same only for the
released MusicGens), and on another machine run `audiocraft-lora import-hf <converted folder>` once (it re-registers
the folder's `t5/`), or copy the hub cache entry.
"""
import hashlib
import json
import logging
from pathlib import Path
import shutil
import tempfile
import typing as tp

from ..checkpoint_io import atomic_write_text
from ..errors import BaseModelError

logger = logging.getLogger(__name__)

T5_SUBDIR = 't5'
_MARKER = '.audiocraft_lora_t5.json'
_EQUAL_MEMO = '.t5_registration.json'
_BY_WIDTH = {512: 't5-small', 768: 't5-base', 1024: 't5-large'}


def choose_name(hf_text_cfg: tp.Mapping[str, tp.Any]) -> str:
    """The T5Conditioner name for the folder's text encoder (its own `_name_or_path` when valid, else by width).

    Args:
        hf_text_cfg: the `text_encoder` section of the HF MusicGen config.json.
    Raises:
        BaseModelError: when the width has no T5Conditioner name (AudioCraft sizes its projection from the name).
    """
    from audiocraft.modules.conditioners import T5Conditioner
    d_model = int(hf_text_cfg.get('d_model', 0))
    own = str(hf_text_cfg.get('_name_or_path') or '')
    own = own[len('google-t5/'):] if own.startswith('google-t5/') else own
    if own in T5Conditioner.MODELS and T5Conditioner.MODELS_DIMS.get(own) == d_model:
        return own
    if d_model in _BY_WIDTH:
        return _BY_WIDTH[d_model]
    raise BaseModelError(f"The text encoder has d_model={d_model}; AudioCraft's T5Conditioner only knows T5 widths "
                         f"{sorted(_BY_WIDTH)} (names {T5Conditioner.MODELS}), so stock AudioCraft can't load it.")


def save_t5(text_encoder: tp.Any, tokenizer: tp.Any, folder: Path) -> Path:
    """Write the T5 encoder (`T5EncoderModel`) and its tokenizer to `folder/t5` with `save_pretrained`."""
    target = Path(folder) / T5_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    text_encoder.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def load_tokenizer(hf_dir: Path, name: str, vocab_size: int) -> tp.Any:
    """The folder's T5 tokenizer; else the cached one of `name`, offline. Raises with the fix when neither exists.

    transformers builds a near-empty T5 tokenizer instead of failing when the vocabulary files are missing, so the
    files are required up front and the result must roughly fill the encoder's vocabulary (`vocab_size`).
    """
    from transformers import AutoTokenizer, T5Tokenizer
    candidates: tp.List[tp.Callable[[], tp.Any]] = []
    if any((hf_dir / f).exists() for f in ('tokenizer.json', 'spiece.model')):
        candidates.append(lambda: AutoTokenizer.from_pretrained(str(hf_dir)))
    candidates.append(lambda: T5Tokenizer.from_pretrained(name, local_files_only=True))
    for candidate in candidates:
        try:
            tokenizer = candidate()
        except (OSError, ValueError, TypeError):
            continue
        if vocab_size // 2 <= len(tokenizer) <= vocab_size:
            return tokenizer
    raise BaseModelError(
        f"{hf_dir} has no usable T5 tokenizer (tokenizer.json or spiece.model for a {vocab_size}-token T5) and "
        f"{name}'s tokenizer is not in the local Hugging Face cache. Save the processor next to the weights once: "
        f"MusicgenProcessor.from_pretrained(<hub id>).save_pretrained('{hf_dir}').")


def digest_folder(folder: Path) -> str:
    """sha1 over the relative names and contents of the files of `folder` (40 hex digits, a valid revision)."""
    hasher = hashlib.sha1()
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        hasher.update(path.relative_to(folder).as_posix().encode())
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 22), b''):
                hasher.update(chunk)
    return hasher.hexdigest()


def _encoder_fingerprint(folder: Path) -> str:
    from transformers import T5EncoderModel
    from ..base_models import fingerprint_state
    model = T5EncoderModel.from_pretrained(str(folder))
    return fingerprint_state(model.state_dict())


def hub_cache_dir(cache_dir: tp.Optional[tp.Union[str, Path]] = None) -> Path:
    """The hub cache transformers reads now (`huggingface_hub.constants.HF_HUB_CACHE`) unless one is given."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def register_in_hub_cache(t5_dir: tp.Union[str, Path], name: str,
                          cache_dir: tp.Optional[tp.Union[str, Path]] = None, digest: tp.Optional[str] = None) -> Path:
    """Install `t5_dir` as the cached snapshot of `name`, so `T5EncoderModel.from_pretrained(name)` finds it offline.

    Args:
        digest: content digest of `t5_dir` when already known (`digest_folder`), else computed.
    Returns:
        Path: the snapshot folder that `name` resolves to (ours, or an equal one already there).
    Raises:
        BaseModelError: if the cache already holds a *different* T5 under `name`.
    """
    t5_dir = Path(t5_dir)
    repo = hub_cache_dir(cache_dir) / ('models--' + name.replace('/', '--'))
    ref = repo / 'refs' / 'main'
    digest = digest or digest_folder(t5_dir)
    if ref.exists():
        snapshot = repo / 'snapshots' / ref.read_text().strip()
        marker = snapshot / _MARKER
        if marker.exists() and json.loads(marker.read_text()).get('digest') == digest:
            return snapshot
        memo = t5_dir.parent / _EQUAL_MEMO  # an equal foreign snapshot, verified before (loading T5 twice is slow)
        key = {'snapshot': str(snapshot), 'digest': digest}
        if memo.exists() and snapshot.is_dir() and json.loads(memo.read_text()) == key:
            return snapshot
        if snapshot.is_dir() and _same_encoder(snapshot, t5_dir):
            _add_missing_files(t5_dir, snapshot)
            atomic_write_text(json.dumps(key) + '\n', memo)
            logger.info("The hub cache already holds %s with the same encoder weights: using it.", name)
            return snapshot
        raise BaseModelError(
            f"The Hugging Face cache already holds a different '{name}' ({snapshot}) than this MusicGen's text "
            f"encoder ({t5_dir}); AudioCraft's T5Conditioner can only load T5 by that name. Remove {repo} (or point "
            "HF_HUB_CACHE to another cache for this model) and run `audiocraft-lora import-hf` again.")
    snapshot = repo / 'snapshots' / digest
    if not snapshot.exists():
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix='.tmp-', dir=snapshot.parent))
        try:
            shutil.copytree(t5_dir, tmp, dirs_exist_ok=True)
            (tmp / _MARKER).write_text(json.dumps({'digest': digest, 'source': str(t5_dir)}) + '\n')
            tmp.replace(snapshot)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    atomic_write_text(digest, ref)
    logger.info("Registered the local T5 text encoder as '%s' in the hub cache (%s).", name, snapshot)
    return snapshot


def _same_encoder(snapshot: Path, t5_dir: Path) -> bool:
    try:
        return _encoder_fingerprint(snapshot) == _encoder_fingerprint(t5_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        logger.warning("Can't read the cached T5 in %s (%s).", snapshot, exc)
        return False


def _add_missing_files(src: Path, snapshot: Path) -> None:
    """Tokenizer files absent from an otherwise equal cached snapshot are added (nothing is overwritten)."""
    for path in src.iterdir():
        if path.is_file() and not (snapshot / path.name).exists():
            shutil.copy2(path, snapshot / path.name)
