"""Non-finite guard: a training step whose loss or gradient norm is not finite is skipped before `optimizer.step()`.

AudioCraft's `MusicGenSolver.run_step` (audiocraft/solvers/musicgen.py:402-415, v1.3.0) clips, steps the optimizer
and the scheduler, and only then raises "Model probably diverged." on a non-finite loss: by that time the adapter
and Adam's moments already hold NaN. `NonFiniteGuard.run_step` wraps that `run_step` instead of copying it:

- while it runs, the optimizer's `step` (or the GradScaler's `step` with fp16 autocast) is replaced by a check:
  loss (recorded by the solver's `_compute_cross_entropy`) and gradient norm (AudioCraft's `metrics['grad_norm']`,
  or computed when clipping is off) must be finite. The flags are all-reduced, so every DDP rank takes the same
  decision. A bad step calls neither `optimizer.step()` nor `lr_scheduler.step()`; AudioCraft's own
  `zero_grad()` then clears the gradients, and its post-step "diverged" `RuntimeError` is swallowed for that step
  only. The next EMA update is skipped too. The adapter and the optimizer/scheduler state are untouched.
- a skipped step is logged, counted (`skipped_steps` in the train metrics of the epoch, a running total in the
  checkpoint under `nonfinite`), and its ce/ppl/grad_norm are left out of the epoch averages.
- after `nonfinite.max_consecutive` skipped steps in a row, training stops with `TrainingDivergedError` (a
  `UserError`: one message naming the fixes, exit status 2, no traceback).

With fp16 autocast, an overflow of the scaled gradients (finite loss) is what the GradScaler expects now and then:
it is skipped and counted, the scaler lowers its scale, and it does not count toward `max_consecutive`.
"""
import contextlib
from dataclasses import dataclass
import functools
import logging
import typing as tp

import flashy
import torch

from .errors import UserError

logger = logging.getLogger(__name__)


class TrainingDivergedError(UserError):
    """Too many training steps in a row had a non-finite loss or gradient norm."""


@dataclass
class _StepDecision:
    decided: bool = False
    skipped: bool = False
    bad_loss_ranks: int = 0
    bad_grad: bool = False
    local_loss: float = float('nan')  # filled in for the messages of a skipped step only
    grad_norm: float = float('nan')
    loss_tensor: tp.Optional[torch.Tensor] = None
    norm_tensor: tp.Optional[torch.Tensor] = None


@contextlib.contextmanager
def _override(obj: tp.Any, name: str, replacement: tp.Callable) -> tp.Iterator[None]:
    """Temporarily shadow `obj.<name>` with an instance attribute (restores any instance attribute it replaced)."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


def _grad_norm(params: tp.Iterable[torch.Tensor]) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).norm()


class NonFiniteGuard:
    """Skip, count and eventually stop on non-finite training steps; a `flashy` state source (checkpointed).

    Args:
        max_consecutive (int): stop after this many skipped steps in a row (config `nonfinite.max_consecutive`).
    """

    def __init__(self, max_consecutive: int = 5):
        if int(max_consecutive) < 1:
            raise UserError(f"nonfinite.max_consecutive={max_consecutive} must be >= 1 (default 5).")
        self.max_consecutive = int(max_consecutive)
        self.total = 0          # skipped steps since the XP started (checkpointed)
        self.consecutive = 0    # skipped steps in a row, counting only non-finite losses/grads (checkpointed)
        self.epoch_skipped = 0  # skipped steps in the current train stage
        self.step_idx: tp.Optional[int] = None  # index of the training step in progress
        self._loss: tp.Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, cfg: tp.Any) -> 'NonFiniteGuard':
        cfg = cfg or {}
        return cls(max_consecutive=cfg.get('max_consecutive', 5))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {'skipped_steps': self.total, 'consecutive': self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get('skipped_steps', 0))
        self.consecutive = int(state.get('consecutive', 0))

    # ------------------------------------------------------------------ hooks called by the solver
    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record the training loss of the current step (called from the solver's `_compute_cross_entropy`)."""
        self._loss = loss.detach()

    def start_epoch(self) -> None:
        self.epoch_skipped = 0

    def epoch_metrics(self, metrics: dict) -> dict:
        """Add `skipped_steps` (this epoch) and `skipped_steps_total` to the train metrics of the epoch."""
        metrics = dict(metrics)
        metrics['skipped_steps'] = self.epoch_skipped
        metrics['skipped_steps_total'] = self.total
        return metrics

    def run_step(self, solver: tp.Any, step_fn: tp.Callable[[], dict], metrics: dict, epoch: int, idx: int) -> dict:
        """Run AudioCraft's training `step_fn` (which fills `metrics` in place) with the check before the step.

        Returns the step metrics; on a skipped step only `lr` is kept.
        Raises:
            TrainingDivergedError: `max_consecutive` steps in a row were skipped.
        """
        self._restore_ema(solver)
        self._loss = None
        self.step_idx = idx
        decision = _StepDecision()
        original_step = solver.optimizer.step

        def guarded(original: tp.Callable) -> tp.Callable:
            @functools.wraps(original)  # keeps the marker torch's LRScheduler puts on optimizer.step
            def step(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
                self._decide(solver, metrics, decision)
                if decision.skipped:
                    return None
                return original(*args, **kwargs)
            return step

        def scheduler_step(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            if decision.skipped:
                return None
            return original_scheduler_step(*args, **kwargs)

        with contextlib.ExitStack() as stack:
            if solver.scaler is not None:
                stack.enter_context(_override(solver.scaler, 'step', guarded(solver.scaler.step)))
            else:
                stack.enter_context(_override(solver.optimizer, 'step', guarded(original_step)))
            if solver.lr_scheduler is not None:
                original_scheduler_step = solver.lr_scheduler.step
                stack.enter_context(_override(solver.lr_scheduler, 'step', scheduler_step))
            try:
                metrics = step_fn()
            except RuntimeError:
                # AudioCraft's post-step `if not loss.isfinite().all(): raise RuntimeError("Model probably
                # diverged.")` (musicgen.py:414): on a step we skipped, the optimizer never ran; the gradients were
                # zeroed just before the raise.
                if not decision.skipped:
                    raise
        if not decision.skipped:
            self.consecutive = 0
            return metrics
        return self._count_skip(solver, decision, metrics, epoch, idx)

    # ------------------------------------------------------------------ internals
    def _decide(self, solver: tp.Any, metrics: dict, decision: _StepDecision) -> None:
        """Both checks on device, one all-reduce, one host sync per step (this runs on every training step)."""
        loss = self._loss
        norm = metrics.get('grad_norm')
        if norm is None:
            norm = _grad_norm(p for group in solver.optimizer.param_groups for p in group['params'])
        norm = torch.as_tensor(norm).detach().float()
        device = 'cuda' if torch.cuda.is_available() else 'cpu'  # as flashy.distrib.average_metrics does
        loss_bad = (~torch.isfinite(loss)).any() if loss is not None else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([loss_bad.to(device), (~torch.isfinite(norm)).any().to(device)]).float()
        flashy.distrib.all_reduce(flags)  # one decision for every rank
        bad_loss_ranks, bad_grad = flags.tolist()
        decision.decided = True
        decision.bad_loss_ranks = int(bad_loss_ranks)
        decision.bad_grad = bad_grad > 0
        decision.skipped = decision.bad_loss_ranks > 0 or decision.bad_grad
        decision.loss_tensor, decision.norm_tensor = loss, norm

    def _count_skip(self, solver: tp.Any, decision: _StepDecision, metrics: dict, epoch: int, idx: int) -> dict:
        if decision.loss_tensor is not None:
            decision.local_loss = float(decision.loss_tensor.float().mean())
        if decision.norm_tensor is not None:
            decision.grad_norm = float(decision.norm_tensor)
        self.total += 1
        self.epoch_skipped += 1
        overflow = solver.scaler is not None and decision.bad_loss_ranks == 0
        if overflow:
            logger.info("fp16 gradient overflow at epoch %d step %d: step skipped, the GradScaler lowers its scale "
                        "(%d skipped in total).", epoch, idx, self.total)
        else:
            self.consecutive += 1
            world = flashy.distrib.world_size()
            what = (f"non-finite loss on {decision.bad_loss_ranks} of {world} rank(s)" if decision.bad_loss_ranks
                    else f"non-finite gradient norm ({decision.grad_norm})")
            logger.warning("Skipped optimizer step at epoch %d step %d: %s (local loss %s). Adapter, optimizer and "
                           "scheduler unchanged; %d skipped in a row (stop at %d), %d in total.", epoch, idx, what,
                           decision.local_loss, self.consecutive, self.max_consecutive, self.total)
        self._skip_next_ema_step(solver)
        kept = {k: v for k, v in metrics.items() if k == 'lr'}
        if self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(self._stop_message(solver, epoch, idx, decision))
        return kept

    def _stop_message(self, solver: tp.Any, epoch: int, idx: int, decision: _StepDecision) -> str:
        cfg = solver.cfg
        hints = [f"lower the learning rate (optim.lr={cfg.optim.lr}; try {float(cfg.optim.lr) / 3:.1e})",
                 "check the data: `audiocraft-lora validate dset=...` (NaN/silent/corrupt clips)"]
        if cfg.get('autocast') and str(cfg.get('autocast_dtype')) == 'float16':
            hints.insert(0, "use autocast_dtype=bfloat16 instead of float16 (fp16 overflows)")
        if cfg.optim.get('max_norm') in (None, 0):
            hints.append("turn gradient clipping back on (optim.max_norm=1.0)")
        hints.append(f"or allow more skipped steps in a row with nonfinite.max_consecutive=N (now "
                     f"{self.max_consecutive})")
        return (f"Training stopped at epoch {epoch}, step {idx}: {self.consecutive} optimizer steps in a row had a "
                f"non-finite loss or gradient norm (last: loss {decision.local_loss}, grad norm "
                f"{decision.grad_norm}); {self.total} skipped in total. Every bad step was skipped before "
                f"optimizer.step(), so the adapter and the last checkpoint are clean. To fix: "
                + "; ".join(hints) + ". A changed lr or dtype is a new XP: add continue_from=<this XP's sig> to start "
                "it from this adapter.")

    @staticmethod
    def _skip_next_ema_step(solver: tp.Any) -> None:
        # StandardSolver.common_train_valid (base.py:546-547) calls `self.ema.step()` right after run_step.
        if getattr(solver, 'ema', None) is not None:
            solver.ema.step = lambda: None

    @staticmethod
    def _restore_ema(solver: tp.Any) -> None:
        ema = getattr(solver, 'ema', None)
        if ema is not None:
            vars(ema).pop('step', None)
