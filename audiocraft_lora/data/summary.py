"""Clip-length statistics and the `dataset.segment_duration` they suggest.

The segment should not be longer than the typical clip: every clip shorter than the segment is padded, and the
user's first model learned to fade into that padding.
"""
from dataclasses import dataclass
import math
import shlex
import statistics
import typing as tp

MAX_SEGMENT_SECONDS = 30  # MusicGen's training segment
HISTOGRAM_EDGES = (0, 2, 5, 10, 15, 20, 25, 30, 45, 60, 120, 300, 600, math.inf)


@dataclass(frozen=True)
class DurationStats:
    """Summary of clip lengths in seconds."""
    count: int
    total: float
    minimum: float
    median: float
    maximum: float


def duration_stats(durations: tp.Sequence[float]) -> DurationStats:
    """Count, total, min, median and max of `durations` (zeros when empty)."""
    if not durations:
        return DurationStats(0, 0.0, 0.0, 0.0, 0.0)
    return DurationStats(len(durations), float(sum(durations)), float(min(durations)),
                         float(statistics.median(durations)), float(max(durations)))


def format_duration(seconds: float) -> str:
    """'9.5 s', '12 min 30 s' or '2 h 05 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def suggest_segment_duration(durations: tp.Sequence[float], cap: float = MAX_SEGMENT_SECONDS) -> int:
    """The median clip length capped at `cap`, rounded down to whole seconds (at least 1): 15 s clips -> 15."""
    if not durations:
        return int(cap)
    return max(1, int(math.floor(min(statistics.median(durations), cap) + 1e-6)))


def length_histogram(durations: tp.Sequence[float], width: int = 40) -> tp.List[str]:
    """Text histogram of clip lengths, one line per non-empty range of bins: ' 10-15 s | ######## 80'."""
    if not durations:
        return []
    counts = [0] * (len(HISTOGRAM_EDGES) - 1)
    for duration in durations:
        for index in range(len(counts)):
            if HISTOGRAM_EDGES[index] <= duration < HISTOGRAM_EDGES[index + 1]:
                counts[index] += 1
                break
    used = [index for index, count in enumerate(counts) if count]
    top = max(counts)
    lines = []
    for index in range(used[0], used[-1] + 1):
        low, high = HISTOGRAM_EDGES[index], HISTOGRAM_EDGES[index + 1]
        label = f"{low:g}-{high:g} s" if math.isfinite(high) else f">= {low:g} s"
        bar = '#' * max(1 if counts[index] else 0, round(width * counts[index] / top))
        lines.append(f"  {label:>11} | {bar} {counts[index]}")
    return lines


def train_command(name: str, segment_duration: int, base_model: tp.Optional[str] = None,
                  datasource: tp.Optional[tp.Mapping[str, str]] = None) -> str:
    """The exact next command after `prepare`, from the current folder.

    `dora run` reads dset yamls only from the checkout's `config/`; a dataset whose yaml went to another
    `--config-root` is passed as `datasource.<split>=...` overrides instead (the split folders the yaml holds).
    """
    from ..checkout import dora_run
    data = [f'dset=audio/{name}'] if datasource is None else [f'datasource.{split}={folder}'
                                                               for split, folder in datasource.items()]
    words = ['solver=musicgen/lora_small'] + data + [f'dataset.segment_duration={segment_duration}']
    if base_model:
        words.append(f'base_model={base_model}')
    return ' '.join([dora_run()] + [shlex.quote(word) for word in words])


def validate_command(name: str, segment_duration: int, config_root: tp.Optional[str] = None) -> str:
    """`audiocraft-lora validate` for the dataset just prepared (with its --config-root when not the checkout's)."""
    words = ['audiocraft-lora', 'validate', f'dset=audio/{name}']
    if config_root is not None:
        words += ['--config-root', config_root]
    return ' '.join(shlex.quote(word) for word in words + ['--segment-duration', str(segment_duration)])
