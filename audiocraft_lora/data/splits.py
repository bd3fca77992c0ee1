"""Deterministic train/valid assignment of source clips.

Splits are decided per source file, before any cutting into segments, so that chunks of one recording never end
up on both sides (that would make validation measure memorisation).
"""
import random
import typing as tp

from ..errors import DataError
from .sources import SourceClip


def assign_splits(clips: tp.Sequence[SourceClip], valid_ratio: float = 0.2,
                  seed: int = 0) -> tp.Tuple[tp.List[SourceClip], tp.List[SourceClip], tp.List[str]]:
    """Split clips into train and valid.

    Clips whose `split` is known keep it; the others are shuffled with `seed` and `valid_ratio` of them (at least
    one) go to valid. If the known splits leave valid empty, `valid_ratio` of train is moved to valid.

    Returns:
        tuple: train clips, valid clips, warnings.
    Raises:
        DataError: Fewer than 2 clips, or an invalid ratio.
    """
    if not 0 < valid_ratio < 1:
        raise DataError(f"--valid-ratio must be between 0 and 1 (exclusive), got {valid_ratio}.")
    if len(clips) < 2:
        raise DataError(f"need at least 2 clips (one for train, one for valid), found {len(clips)}. "
                        f"Fix: add more audio.")
    warnings: tp.List[str] = []
    train = [clip for clip in clips if clip.split == 'train']
    valid = [clip for clip in clips if clip.split == 'valid']
    unsplit = [clip for clip in clips if clip.split is None]
    if unsplit and (train or valid):
        warnings.append(f"{len(unsplit)} record(s) have no split while others do; they were split "
                        f"{1 - valid_ratio:.0%}/{valid_ratio:.0%} with seed {seed}.")
    if unsplit:
        more_train, more_valid = _seeded_split(unsplit, valid_ratio, seed, keep_one_train=not train)
        train += more_train
        valid += more_valid
    if not valid:
        train, valid = _seeded_split(train, valid_ratio, seed, keep_one_train=True)
        warnings.append(f"no validation clips were given; moved {len(valid)} train clip(s) to valid (seed {seed}).")
    if not train:
        raise DataError("every clip is in the validation split; training needs at least one train clip. "
                        "Fix: mark some records as \"train\".")
    return train, valid, warnings


def _seeded_split(clips: tp.Sequence[SourceClip], valid_ratio: float, seed: int,
                  keep_one_train: bool) -> tp.Tuple[tp.List[SourceClip], tp.List[SourceClip]]:
    ordered = sorted(clips, key=lambda clip: str(clip.audio_path))
    random.Random(seed).shuffle(ordered)
    num_valid = max(1, round(len(ordered) * valid_ratio))
    if keep_one_train:
        num_valid = min(num_valid, len(ordered) - 1)
    valid = sorted(ordered[:num_valid], key=lambda clip: str(clip.audio_path))
    train = sorted(ordered[num_valid:], key=lambda clip: str(clip.audio_path))
    return train, valid
