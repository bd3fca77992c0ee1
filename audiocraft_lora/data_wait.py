"""How long training waits for its batches: the `data_wait` metric of each train epoch, and a warning when the data
loader holds the GPU back.

The layers' CUDA graphs make a training step short (musicgen-small, batch 16 x 15 s: ~0.09 s of LM on an H100, plus
EnCodec's encode). AudioCraft's dataset reads, resamples and down-mixes every clip in the loader's workers at every
step: on one core a 15 s clip already at the model's rate and channels takes 5-9 ms, a 44.1 kHz stereo one ~40 ms
(WAV or MP3; resampling is most of it; `benchmarks/data_loading.py`). A batch of 16 such clips is ~0.7 s of one
worker, so AudioCraft's default 4 workers fall behind a step of less than ~0.17 s and the step waits. From the second
step of an epoch on, the time from the end of one step (its GPU work done) to the start of the next is the wait for
the next batch; `data_wait` is its share of the epoch's step time (the mean over ranks). Above `WARN_SHARE` the solver
says once what to change.
"""
import os
import time
import typing as tp

import flashy
import torch

__all__ = ['DataWait', 'WARN_SHARE']

WARN_SHARE = 0.2
MIN_STEPS = 4  # (fewer measured steps: too few to tell)


class DataWait:
    """Step boundaries of a train epoch -> the share of its time spent waiting for batches."""

    def __init__(self, clock: tp.Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.warned = False
        self.start_epoch()

    def start_epoch(self) -> None:
        self.waited = self.busy = 0.0
        self.steps = 0
        self._begun: tp.Optional[float] = None
        self._ended: tp.Optional[float] = None

    def step_begins(self) -> None:
        now = self.clock()
        if self._ended is not None:  # (the epoch's first batch also waits for the workers to start: not counted)
            self.waited += now - self._ended
            self.steps += 1
        self._begun = now

    def step_ends(self, device: tp.Union[str, torch.device, None] = None) -> None:
        """After a training step; on CUDA its kernels are waited for first (the loop's metrics would wait for them
        right after: no time lost), so that what follows is the wait for data alone."""
        if device is not None and torch.device(device).type == 'cuda':
            torch.cuda.synchronize(device)
        self._ended = self.clock()
        if self._begun is not None and self.steps:
            self.busy += self._ended - self._begun

    def share(self) -> tp.Optional[float]:
        """The share of the epoch's measured steps (wait + step) spent waiting for a batch; None below MIN_STEPS."""
        if self.steps < MIN_STEPS or self.waited + self.busy <= 0:
            return None
        return self.waited / (self.waited + self.busy)

    def advice(self, num_workers: int, epoch: int, cached: bool = False) -> tp.Optional[str]:
        """The warning to log once per run when the share is above WARN_SHARE, else None (`cached`: the batches come
        from a token cache, `cache.path`: no audio to convert)."""
        share = self.share()
        if share is None or share <= WARN_SHARE or self.warned:
            return None
        self.warned = True
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        fix = (f"Raise dataset.num_workers (this machine has {cpus} CPUs)" + (
            " (the batches come from the token cache, cache.path)." if cached else
            ", or convert the audio once to the model's sample rate and channels (`audiocraft-lora prepare ... "
            "--convert`): a worker resamples a 15 s 44.1 kHz clip in ~40 ms, and reads one already at 32 kHz mono "
            "in 5-9 ms (benchmarks/data_loading.py times your files)."))
        return (f"Training waited for its batches {share:.0%} of epoch {epoch} ({self.waited:.1f} s of "
                f"{self.waited + self.busy:.1f} s, {self.steps} steps): the data loader ({num_workers} workers) is "
                f"slower than the training step. {fix}")

    def epoch_metrics(self, metrics: dict, num_workers: int, epoch: int, logger: tp.Any, cached: bool = False) -> dict:
        """After a train epoch: `metrics` with `data_wait` (the mean over ranks: every rank runs as many steps, so
        each has a share or none has), and the advice logged once per run when it is due."""
        share = self.share()
        if share is not None:
            metrics['data_wait'] = flashy.distrib.average_metrics({'data_wait': share})['data_wait']
        advice = self.advice(num_workers, epoch, cached=cached)
        if advice:
            logger.warning(advice)
        return metrics
