"""Train on a subset of the train manifest: the dataset-size axis of `grids/lora_sweep.py`.

Config (`train_subset`, in solver/musicgen/default.yaml; null = the whole manifest):

    train_subset.fraction   a fraction in (0, 1] of the train manifest's files
    train_subset.num_files  or a number of files
    train_subset.seed       which files (the draw is deterministic, the manifest order is kept)

`apply_train_subset(cfg)` runs before the solver is built (`audiocraft_lora.train.get_solver`): it writes the chosen
manifest lines to `<xp folder>/train_subset/data.jsonl` (atomically, rank zero) and points `datasource.train` at that
folder. valid/evaluate/generate are untouched, so valid CE stays comparable across dataset sizes.
Raises `UserError` for a bad fraction/number or both set.
"""
import gzip
import logging
from pathlib import Path
import random
import typing as tp

import omegaconf

from .errors import UserError

logger = logging.getLogger(__name__)


def read_manifest_lines(split_folder: tp.Union[str, Path]) -> tp.List[str]:
    """Non-empty lines of `data.jsonl` or `data.jsonl.gz` in a split folder."""
    folder = Path(split_folder)
    if (folder / 'data.jsonl').exists():
        text = (folder / 'data.jsonl').read_text()
    elif (folder / 'data.jsonl.gz').exists():
        text = gzip.decompress((folder / 'data.jsonl.gz').read_bytes()).decode()
    else:
        raise UserError(f"No data.jsonl(.gz) in the train split folder {folder} (datasource.train).")
    return [line for line in text.splitlines() if line.strip()]


def choose_subset(num_total: int, fraction: tp.Optional[float], num_files: tp.Optional[int],
                  seed: int) -> tp.List[int]:
    """Indices (sorted) of the files kept out of `num_total`."""
    if fraction is not None and num_files is not None:
        raise UserError("Set train_subset.fraction or train_subset.num_files, not both.")
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise UserError(f"train_subset.fraction={fraction} must be in (0, 1].")
        count = max(1, round(float(fraction) * num_total))
    else:
        assert num_files is not None
        if not 1 <= int(num_files) <= num_total:
            raise UserError(f"train_subset.num_files={num_files} must be between 1 and the {num_total} files of "
                            "the train manifest.")
        count = int(num_files)
    return sorted(random.Random(int(seed)).sample(range(num_total), count))


def apply_train_subset(cfg: omegaconf.DictConfig, xp_folder: tp.Optional[Path] = None) -> tp.Optional[Path]:
    """Write the subset manifest and point `cfg.datasource.train` at it; returns its folder (None: no subset)."""
    subset = cfg.get('train_subset')
    if not subset or (subset.get('fraction') is None and subset.get('num_files') is None):
        return None
    import flashy
    from .checkpoint_io import write_text_atomic
    if xp_folder is None:
        import dora
        xp_folder = dora.get_xp().folder
    lines = read_manifest_lines(cfg.datasource.train)
    keep = choose_subset(len(lines), subset.get('fraction'), subset.get('num_files'), subset.get('seed', 0))
    folder = Path(xp_folder) / 'train_subset'
    if flashy.distrib.is_rank_zero():
        write_text_atomic(folder / 'data.jsonl', ''.join(lines[i] + '\n' for i in keep))
    flashy.distrib.barrier()
    logger.info("Training on %d of the %d files of %s (train_subset, seed %s): %s", len(keep), len(lines),
                cfg.datasource.train, subset.get('seed', 0), folder)
    cfg.datasource.train = str(folder)
    return folder
