"""How EnCodec tokenizes each training batch: `lora.encode_chunk` items at a time, chosen by the memory plan.

    lora.encode_chunk: auto   # the most items at once that fit beside the training step (memory_plan), else 4;
                              # 4 where nothing is planned (off CUDA, lora.memory_budget_gib=none)
    lora.encode_chunk: N      # N items at a time (0: the whole batch at once, as AudioCraft does)

EnCodec treats every item on its own (convolutions, LSTM, nearest codeword), so the tokens don't depend on the chunk
(up to the convolutions' float rounding, which cuDNN's choice of algorithm changes anyway). What the chunk changes:
- time: the encoder's LSTM runs the frames of a chunk one after the other (1500 for 30 s), so every chunk pays that
  sequence again. On an H200 (benchmarks/encode_chunks.py, session 20), 16 x 30 s float32: the whole batch 0.108 s,
  8 at a time 0.143 s, 4 at a time 0.210 s, 1 at a time 0.555 s; 16 x 15 s: 0.052 / 0.067 / 0.125 s. The LoRA
  step itself (layers' CUDA graphs, musicgen-small b16 x 30 s) is 0.137 s: the encode in chunks of 4 was more.
- memory: the float32 activations peak at ~1.15 GiB per 30 s item (18.3 GiB for 16 x 30 s, linear in items and
  seconds), 1.31-1.43x of what the estimate on fake tensors counts (`ENCODE_FACTOR`: cuDNN's workspaces are
  invisible to it). With the layers' CUDA graphs that memory comes on top of the step's: the graphs' pool keeps
  the step's activations between steps, and the encode can't use it. Without them the encode comes before the
  step's activations: the larger of the two counts.

`auto` (`plan`, from memory_plan.plan_training): the largest of the whole batch, half of it, a quarter... (down to 4)
whose encode fits in the budget on top of the chosen plan's LM step (`encode_bytes`; where the graphs may run, else
beside it: the larger of the two); where none does, 4 items, and the plan leaves the graphs off (the eager step's
estimate holds the encode). Host memory (CPU runs) isn't planned: 4 items, as before. At run time a chunk that runs
out of CUDA memory is halved and tried again, with a warning (`ChunkedEncode`); it stays halved for the run, every
stage.
"""
import dataclasses
import logging
import typing as tp
import warnings

import torch
from torch import nn

__all__ = ['ChunkedEncode', 'chunk_encoder', 'encode_in_chunks', 'initial_chunk', 'item_bytes', 'encode_bytes',
           'candidates', 'choose_chunk', 'plan', 'ENCODE_FACTOR', 'FALLBACK_CHUNK']

logger = logging.getLogger(__name__)

ENCODE_FACTOR = 1.5  # measured peak / fake-tensor estimate of EnCodec 32 kHz's encode: 1.31-1.43 (H200, session 20)
FALLBACK_CHUNK = 4    # items at a time where the plan finds no room for more, or makes no plan


def encode_in_chunks(encode: tp.Callable, chunk: int, x: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Any]:
    """A compression model's `encode(x)` run `chunk` items of the batch at a time (0: all at once): the same tokens,
    and the peak of the encode's float32 activations is that of `chunk` items."""
    if chunk <= 0 or x.shape[0] <= chunk:
        return encode(x)
    parts = [encode(piece) for piece in x.split(chunk)]
    scales = [scale for _, scale in parts]
    return torch.cat([codes for codes, _ in parts]), (None if scales[0] is None else torch.cat(scales))


class ChunkedEncode:
    """`compression_model.encode`, `chunk` items at a time (0: all at once). Where a chunk runs out of CUDA memory it
    is halved and the batch encoded again (no tokens were returned), with a warning naming the key; it stays halved."""

    def __init__(self, encode: tp.Callable, chunk: int):
        self.encode = encode
        self.chunk = int(chunk)

    def __call__(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Any]:
        while True:
            try:
                return encode_in_chunks(self.encode, self.chunk, x)
            except torch.OutOfMemoryError:
                items = self.chunk if 0 < self.chunk < x.shape[0] else x.shape[0]
                if items <= 1:
                    raise
            # (outside the except block: the failed attempt's tensors are freed with its traceback)
            self.chunk = items // 2
            torch.cuda.empty_cache()
            logger.warning("EnCodec ran out of GPU memory encoding %d items of a training batch at once: %d at a time "
                           "from now on (set lora.encode_chunk=%d to start there; the tokens are the same).", items,
                           self.chunk, self.chunk)


def chunk_encoder(compression_model: nn.Module, chunk: int) -> None:
    """Make `compression_model.encode` tokenize `chunk` items at a time (0: all at once; an instance attribute, so
    the class's method, weights and state dict are untouched)."""
    compression_model.__dict__.pop('encode', None)
    compression_model.encode = ChunkedEncode(type(compression_model).encode.__get__(compression_model), chunk)


def initial_chunk(setting: tp.Any) -> int:
    """The chunk before the memory plan (and without one): an explicit number as it is; `auto` `FALLBACK_CHUNK` (the
    plan may take more on CUDA; host memory isn't planned: a CPU run at 16 x 30 s would hold ~18 GiB for the whole
    batch at once)."""
    return FALLBACK_CHUNK if str(setting).lower() == 'auto' else int(setting)


def candidates(batch: int) -> tp.List[int]:
    """Chunks `auto` tries, most items first: the whole batch, then halves, down to `FALLBACK_CHUNK` items."""
    sizes, size = [], batch
    while size > FALLBACK_CHUNK:
        sizes.append(size)
        size = -(-size // 2)
    return sizes + [min(FALLBACK_CHUNK, batch)]


def item_bytes(compression_model: nn.Module, channels: int, samples: int) -> int:
    """What the encode of one item holds at its peak on fake tensors (its activations; the input not counted)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from .memory_estimate import PeakTracker, _CUDA_BLOCK
    device = next(iter(compression_model.parameters()), torch.empty(0)).device
    tracker = PeakTracker(round_to=_CUDA_BLOCK if device.type == 'cuda' else 1)
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True), tracker, torch.no_grad():
        warnings.simplefilter('ignore')
        one = torch.zeros(1, channels, samples, device=device)
        audio = tracker.current
        type(compression_model).encode(compression_model, one)
        return tracker.peak - audio


def encode_bytes(compression_model: nn.Module, batch: int, channels: int, samples: int, chunk: int,
                 per_item: tp.Optional[int] = None) -> int:
    """Bytes the encode of a training batch holds at its peak, `chunk` items at a time (0: all): the batch's float32
    audio, and `ENCODE_FACTOR` times what the encode of that many items holds on fake tensors (`item_bytes`, per
    item: the activations are per item; computed here unless given)."""
    if per_item is None:
        per_item = item_bytes(compression_model, channels, samples)
    items = batch if chunk <= 0 else min(chunk, batch)
    return batch * channels * samples * 4 + int(ENCODE_FACTOR * per_item * items)


def choose_chunk(compression_model: nn.Module, batch: int, channels: int, samples: int,
                 fits: tp.Callable[[int], bool]) -> tp.Tuple[int, int, bool]:
    """`auto`: (chunk, its `encode_bytes`, whether it fit) for the first of `candidates` whose encode `fits` (given
    its bytes, on top of the step), or `FALLBACK_CHUNK` items where none does."""
    per_item = item_bytes(compression_model, channels, samples)
    for chunk in candidates(batch):
        size = encode_bytes(compression_model, batch, channels, samples, chunk, per_item)
        if fits(size):
            return (0 if chunk >= batch else chunk), size, True
    return chunk, size, False


def plan(solver: tp.Any, shape: tp.Any, autocast_dtype: tp.Optional[torch.dtype], budget: int,
         summary: dict) -> None:
    """`lora.encode_chunk` on the chosen checkpointing plan. Where the layers' CUDA graphs may run (their pool keeps
    the step's activations while the next batch is encoded) the encode is counted on top of the LM's step, estimated
    without it; with `lora.graph_layers=false` it comes before the step's activations (the larger of the two).
    `auto` takes the most items at once that fit; an explicit chunk is counted the same way. `summary` gets the
    chunk, `encode_bytes` (on top: what plan_graphs leaves room for; 0 without graphs) and `needed_bytes` with it.
    Called by memory_plan.plan_training once the checkpointing plan is chosen (`shape`: its StepShape)."""
    from .memory_estimate import Estimate, estimate_step
    from .memory_plan import needed  # (memory_plan imports this module)
    settings = solver.speed_settings
    cm = solver.compression_model
    on_top = str(settings.graph_layers).lower() != 'false'
    auto = str(settings.encode_chunk).lower() == 'auto'
    try:
        lm_step = estimate_step(solver.model, cm, dataclasses.replace(shape, samples=None), autocast_dtype)

        def with_encode(size: int) -> int:  # on top of the graphed step, or before the eager step's activations
            step = lm_step.step + size if on_top else max(lm_step.step, size)
            return needed(Estimate(resident=lm_step.resident, step=step))
        where = "beside the step in the layers' CUDA graphs" if on_top else 'before the eager step (graph_layers=false)'
        if auto:
            chunk, size, fit = choose_chunk(cm, shape.batch, shape.channels, shape.samples,
                                            lambda size: with_encode(size) <= budget)
            why = f'fits {where}' if fit else (f'no more fits {where}' + (', so the plan leaves the graphs off'
                                                                          if on_top else ''))
        else:
            chunk = int(settings.encode_chunk)
            size = encode_bytes(cm, shape.batch, shape.channels, shape.samples, chunk)
            why = 'lora.encode_chunk' + ('' if with_encode(size) <= budget else f', more than fits {where}')
    except Exception as error:  # (as the step's estimate: an op fake tensors can't run must not stop training)
        solver.logger.warning("Could not estimate EnCodec's encode (%s: %s); it encodes %s items at a time, its memory "
                              "not planned beside the layers' CUDA graphs.", type(error).__name__, error,
                              initial_chunk(settings.encode_chunk))
        return
    if auto:
        solver.speed_settings = dataclasses.replace(settings, encode_chunk=chunk)
        chunk_encoder(cm, chunk)
    items = shape.batch if chunk <= 0 else min(chunk, shape.batch)
    summary.update(encode_chunk=chunk, encode_bytes=size if on_top else 0,
                   needed_bytes=max(int(summary['needed_bytes']), with_encode(size)))
    solver.logger.info("EnCodec encodes each training batch %d of %d items at a time (%s; estimated %.2f GiB "
                       "at its peak).", items, shape.batch, why, size / 2 ** 30)
