"""AudioCraft's token cache (`cache.path`, `cache.write`), made safe to use with the LoRA solver.

AudioCraft's MusicGenSolver can save the EnCodec tokens (and the MusicInfo) of every training mini-batch to
`cache.path` (`cache.write=true`; one zip per batch, `<cache.path>/<epoch:05d>/<index:06d>.zip`), and a later XP can
read them instead of decoding audio and running the compression model's encoder (`cache.path` set,
`cache.write=false`). The reading XP trains on exactly the batches the writing XP saw, epoch by epoch; valid,
evaluate and generate still read audio.

Two hooks, both called from `audiocraft_lora.train.get_solver`:

`prepare(cfg)`, before the solver is built:
- allows the cached `MusicInfo` / `AudioMeta` objects through `torch.load(weights_only=True)`: torch >= 2.6 refuses
  them otherwise, and AudioCraft 1.3.0's cached loader predates that default;
- makes a relative `cache.path` absolute (relative to where `dora run` was launched, like the manifests);
- on write, records what the cache was made from in `<cache.path>/lora_cache.json` (base model, digest of the train
  manifest, segment duration, global batch size, padding setting);
- on read, checks that record against the current config and that every epoch to train has at least
  `optim.updates_per_epoch` batches.

The tokens depend on the compression model, not on the LM: `attach` records a fingerprint of the compression
model's weights and a reading XP must have the same one, so any base with the same EnCodec (musicgen-small,
-medium and -large all use the 32 kHz one) trains from the same cache, whether named by hub id or local folder. A
record without the fingerprint (older caches) is matched on the `base_model` string, as before.

`attach(solver)`, once the solver is built, fixes three things in AudioCraft 1.3.0's cache, which can't read back
what MusicGenSolver writes:
- its `CachedBatchLoader._load_one` asserts that a batch of `MusicInfo` is a tensor (always fails): replaced by
  `CachedBatchLoader` below, which returns the infos as a list;
- it starts `ThreadPoolExecutor(dataset.num_workers)`, which fails with `num_workers=0` (our CPU recipes): at
  least one reader thread here;
- the writing XP gets `best_metric_name=None` (AudioCraft tests `if write_num_shards:`, true for 1 shard), so its
  "best" adapter is just the last one: restored to valid `ce` when the cache has a single shard.

Raises `TokenCacheError` (a `UserError`: one message naming the key and the fix) when a check fails.
"""
import hashlib
import json
import logging
from pathlib import Path
import typing as tp

import omegaconf

from .errors import UserError

logger = logging.getLogger(__name__)

RECORD_NAME = 'lora_cache.json'
# what must be equal between the XP that wrote the cache and one that reads it
MATCHING_KEYS = ('train_manifest_sha1', 'segment_duration', 'padding_with_special_token')
FINGERPRINT_KEY = 'compression_fingerprint'  # added by `attach` once the compression model is loaded


class TokenCacheError(UserError):
    """The token cache can't be used with this configuration."""


def allow_cached_batches() -> None:
    """Allow the dataclasses AudioCraft pickles into cached batches through `torch.load(weights_only=True)`."""
    import torch
    from audiocraft.data.audio_dataset import AudioMeta, SegmentInfo
    from audiocraft.data.info_audio_dataset import AudioInfo
    from audiocraft.data.music_dataset import MusicInfo
    from audiocraft.data.zip import PathInZip
    torch.serialization.add_safe_globals([MusicInfo, AudioInfo, AudioMeta, SegmentInfo, PathInZip])


def manifest_digest(split_folder: tp.Union[str, Path]) -> str:
    """sha1 of a split's manifest (`data.jsonl` or `data.jsonl.gz`), so that equal subsets share a cache."""
    folder = Path(split_folder)
    for name in ('data.jsonl', 'data.jsonl.gz'):
        if (folder / name).exists():
            return hashlib.sha1((folder / name).read_bytes()).hexdigest()
    raise TokenCacheError(f"No data.jsonl(.gz) in the train split folder {folder} (datasource.train).")


def cache_record(cfg: omegaconf.DictConfig, world_size: int = 1) -> dict:
    """What a cache written with `cfg` holds. `cfg.dataset.batch_size` is per rank here (see train.get_solver)."""
    return {
        'base_model': str(cfg.get('base_model')),
        'train_manifest': str(cfg.datasource.train),
        'train_manifest_sha1': manifest_digest(cfg.datasource.train),
        'segment_duration': cfg.dataset.segment_duration,
        'padding_with_special_token': bool(cfg.tokens.padding_with_special_token),
        'batch_size': int(cfg.dataset.batch_size) * world_size,
        'epochs': int(cfg.optim.epochs),
        'updates_per_epoch': cfg.optim.updates_per_epoch,
    }


def prepare(cfg: omegaconf.DictConfig) -> None:
    """Check and set up `cfg.cache` before the solver is built; no-op when `cache.path` is empty."""
    cache = cfg.get('cache')
    if not cache or not cache.get('path'):
        return
    import flashy
    from dora import git_save
    allow_cached_batches()
    cfg.cache.path = git_save.to_absolute_path(str(cache.path))
    folder = Path(cfg.cache.path)
    world = flashy.distrib.world_size()
    if cfg.get('execute_only') is not None:
        return  # no train stage: the cache is neither written nor read
    record = cache_record(cfg, world)
    if cache.write:
        _prepare_write(folder, record)
    else:
        _check_read(cfg, folder, record)


def _prepare_write(folder: Path, record: dict) -> None:
    import flashy
    from .checkpoint_io import write_text_atomic
    existing = _read_record(folder)
    if existing is not None:
        _check_same_source(existing, record, folder, fix="use another cache.path, or delete this one")
        if FINGERPRINT_KEY in existing:  # checked against this XP's compression model in `attach`
            record[FINGERPRINT_KEY] = existing[FINGERPRINT_KEY]
    if flashy.distrib.is_rank_zero():
        write_text_atomic(folder / RECORD_NAME, json.dumps(record, indent=2, sort_keys=True) + '\n')
    flashy.distrib.barrier()
    logger.info("Token cache: writing the EnCodec tokens of every training batch to %s", folder)


def _read_record(folder: Path) -> tp.Optional[dict]:
    path = folder / RECORD_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _check_same_source(written: dict, current: dict, folder: Path, fix: str) -> None:
    for key in MATCHING_KEYS:
        if written.get(key) != current.get(key):
            raise TokenCacheError(
                f"The token cache {folder} was written with {key}={written.get(key)!r} "
                f"(train manifest {written.get('train_manifest')}) but this XP has {key}={current.get(key)!r} "
                f"(train manifest {current.get('train_manifest')}): {fix}.")


def _check_read(cfg: omegaconf.DictConfig, folder: Path, record: dict) -> None:
    write_hint = (f"write it first with an XP on the same data and base: `dora run ... cache.path={folder} "
                  "cache.write=true`")
    if not folder.is_dir():
        raise TokenCacheError(f"cache.path={folder} does not exist: {write_hint}.")
    written = _read_record(folder)
    if written is None:
        logger.warning("Token cache %s has no %s (not written by audiocraft-lora): its source can't be checked.",
                       folder, RECORD_NAME)
    else:
        _check_same_source(written, record, folder,
                           fix="read a cache written from the same train manifest and segment duration")
        if written['batch_size'] < record['batch_size']:
            raise TokenCacheError(
                f"The token cache {folder} holds batches of {written['batch_size']} items but this XP needs "
                f"dataset.batch_size={record['batch_size']}: use dataset.batch_size<={written['batch_size']}.")
    needed = int(cfg.optim.updates_per_epoch or 1)
    last_epoch = int(cfg.get('stop_at_epoch') or cfg.optim.epochs)
    for epoch in range(1, min(last_epoch, int(cfg.optim.epochs)) + 1):
        epoch_folder = folder / f"{epoch:05d}"
        found = len(list(epoch_folder.glob('*.zip'))) if epoch_folder.is_dir() else 0
        if found < needed:
            raise TokenCacheError(
                f"The token cache {folder} has {found} batches for epoch {epoch} ({epoch_folder}) but this XP "
                f"trains {needed} updates per epoch for {cfg.optim.epochs} epochs: lower optim.epochs / "
                f"optim.updates_per_epoch to what was written, or {write_hint} and at least as many epochs and "
                "updates per epoch.")
    logger.info("Token cache: training batches read from %s (the compression model's encoder is not run for "
                "training)", folder)


def _cached_loader_class():
    from audiocraft.utils import cache as ac_cache

    class CachedBatchLoader(ac_cache.CachedBatchLoader):
        """AudioCraft's loader of cached batches, reading batches of `MusicInfo` correctly, with >= 1 thread."""

        def __init__(self, cache_folder: Path, batch_size: int, num_workers: int = 10, min_length: int = 1):
            super().__init__(cache_folder, batch_size, max(1, int(num_workers)), min_length)

        def _load_one(self, index: int):
            import zipfile
            import flashy
            import torch
            zip_path = self._zip_path(index)
            if not zip_path.exists():
                if index < self.min_length:
                    raise TokenCacheError(
                        f"The token cache {self.cache_folder} should have at least {self.min_length} batches for "
                        f"epoch {self._current_epoch}, but {zip_path} doesn't exist.")
                return None
            with zipfile.ZipFile(zip_path, 'r') as zf:
                names = sorted(zf.namelist(), key=int)
                world_size = flashy.distrib.world_size()
                if len(names) < self.batch_size * world_size:
                    raise TokenCacheError(
                        f"The token cache batch {zip_path} holds {len(names)} items but {self.batch_size} x "
                        f"{world_size} GPUs are needed: lower dataset.batch_size.")
                start = flashy.distrib.rank() * self.batch_size
                entries = []
                for name in names[start:start + self.batch_size]:
                    with zf.open(name) as f:
                        entries.append(torch.load(f, map_location='cpu', weights_only=True))
            out = []
            for part in zip(*entries):  # one part per object given to CachedBatchWriter.save (here: the infos)
                out.append(torch.stack(part) if isinstance(part[0], torch.Tensor) else list(part))
            return out

    return CachedBatchLoader


def attach(solver) -> None:
    """Swap AudioCraft's cached loader for the fixed one, and keep valid-CE best-state selection when writing."""
    cfg = solver.cfg
    if not cfg.get('cache') or not cfg.cache.get('path'):
        return
    if cfg.cache.write and int(cfg.cache.write_num_shards) == 1:
        solver._best_metric_name = 'ce'
    _check_compression_model(solver, Path(cfg.cache.path), bool(cfg.cache.write))
    old = getattr(solver, '_cached_batch_loader', None)
    if old is None:
        return
    loader = _cached_loader_class()(old.cache_folder, old.batch_size, old.num_workers, old.min_length)
    solver._cached_batch_loader = loader
    solver.dataloaders['train'] = loader


def _check_compression_model(solver, folder: Path, write: bool) -> None:
    """The cache's tokens must come from this XP's compression model (see the module doc); a writer records it."""
    import flashy
    from .base_models import fingerprint_state
    from .checkpoint_io import write_text_atomic
    record = _read_record(folder)
    if record is None:
        return  # (read: a cache written elsewhere, warned about in `prepare`)
    fingerprint = fingerprint_state(solver.compression_model.state_dict())
    base = str(solver.cfg.get('base_model'))
    written = record.get(FINGERPRINT_KEY)
    if written is None and not write and record.get('base_model') != base:
        raise TokenCacheError(
            f"The token cache {folder} was written with base_model={record.get('base_model')!r} but this XP has "
            f"base_model={base!r}: read a cache written from the same base model (or rewrite it with this version, "
            "which records the compression model and lets bases that share it share the cache).")
    if written is not None and written != fingerprint:
        raise TokenCacheError(
            f"The token cache {folder} holds tokens of another compression model (written with base_model="
            f"{record.get('base_model')!r}; this XP's base_model={base!r} has different EnCodec weights): "
            + ("use another cache.path." if write else "write a cache with this base (cache.write=true, another "
               "cache.path)."))
    if write and written is None and flashy.distrib.is_rank_zero():
        record[FINGERPRINT_KEY] = fingerprint
        write_text_atomic(folder / RECORD_NAME, json.dumps(record, indent=2, sort_keys=True) + '\n')
