"""data_wait: the share of a train epoch spent waiting for batches, as a metric and a warning (once per run) naming
what to change, so a data loader slower than the GPU step doesn't go unseen."""
import logging
import time

from audiocraft_lora.data_wait import DataWait, WARN_SHARE
from helpers import DEBUG_ARGS, build_solver


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _epoch(watch: DataWait, clock: Clock, steps: int, wait: float, busy: float, first_wait: float = 5.0) -> None:
    watch.start_epoch()
    for index in range(steps):
        clock.now += first_wait if index == 0 else wait
        watch.step_begins()
        clock.now += busy
        watch.step_ends()


def test_share_counts_the_waits_between_steps_not_before_the_first():
    clock = Clock()
    watch = DataWait(clock)
    _epoch(watch, clock, steps=6, wait=0.3, busy=0.1)  # (the 5 s before the first batch: workers starting)
    assert abs(watch.share() - 0.75) < 1e-9 and watch.steps == 5
    _epoch(watch, clock, steps=6, wait=0.0, busy=0.1)  # (the last epoch's end isn't this epoch's wait)
    assert watch.share() == 0.0
    _epoch(watch, clock, steps=3, wait=1.0, busy=0.1)
    assert watch.share() is None  # too few steps to tell


def test_advice_names_the_fixes_once_per_run_and_only_above_the_threshold():
    clock = Clock()
    watch = DataWait(clock)
    _epoch(watch, clock, steps=8, wait=0.1 * WARN_SHARE, busy=0.1)
    assert watch.advice(num_workers=4, epoch=1) is None
    _epoch(watch, clock, steps=8, wait=0.2, busy=0.1)
    advice = watch.advice(num_workers=4, epoch=2)
    assert advice is not None and '67% of epoch 2' in advice and '(4 workers)' in advice
    assert 'dataset.num_workers' in advice and 'prepare ... --convert' in advice
    assert watch.advice(num_workers=4, epoch=2) is None  # (once per run)
    cached = DataWait(clock)
    _epoch(cached, clock, steps=8, wait=0.2, busy=0.1)
    advice = cached.advice(num_workers=2, epoch=1, cached=True)
    assert 'dataset.num_workers' in advice and 'cache.path' in advice and '--convert' not in advice


class SlowLoader:
    """The solver's train loader, each batch after `delay` seconds (a loader slower than the step)."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay
        self.dataset, self.sampler = loader.dataset, getattr(loader, 'sampler', None)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_a_slow_loader_shows_in_the_train_metrics_and_a_warning(dora_dir, caplog):
    solver, xp = build_solver(DEBUG_ARGS + ['optim.epochs=1', 'optim.updates_per_epoch=6'])
    solver.model.cfg_dropout.p = 0.0
    step = time.perf_counter()
    solver.dataloaders['train'] = SlowLoader(solver.dataloaders['train'], delay=0.0)
    with xp.enter():
        quick = solver.run_stage('train', solver.train)
    step = (time.perf_counter() - step) / 6
    assert 0.0 <= quick['data_wait'] < 1.0
    with xp.enter():
        solver.commit(save_checkpoints=False)  # (the next epoch)
    solver.dataloaders['train'] = SlowLoader(solver.dataloaders['train'].loader, delay=3 * step)
    with caplog.at_level(logging.WARNING), xp.enter():
        slow = solver.run_stage('train', solver.train)
    assert slow['data_wait'] > max(WARN_SHARE, quick['data_wait'])
    assert any('Training waited for its batches' in r.getMessage() and 'dataset.num_workers' in r.getMessage()
               for r in caplog.records)
