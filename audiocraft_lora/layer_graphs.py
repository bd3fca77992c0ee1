"""CUDA graphs of the LM's transformer layers in training steps (`lora.graph_layers`).

At batch 4, or 15 s segments, a LoRA step on a GPU is bound by the host: the GPU work of musicgen-small at batch 4 x
30 s is ~0.65x that of full fine-tuning, but the ~2,200 kernel launches, AudioCraft's attention, peft and the fast
path's Python take longer than the kernels (`benchmarks/gpu_model.py`). `torch.cuda.make_graphed_callables` records
the layers' forward and backward once and then replays each as one launch, with the very kernels eager mode runs:
the same values as eager (unlike inductor's), none of the Python at replay. Measured on an H100 (session 12,
`benchmarks/step_time.py`, a graph per layer then): musicgen-small batch 4 x 30 s, 0.058 s a step against 0.166 s
eager and 0.116 s for AudioCraft's full fine-tuning; medium batch 4, 0.163 vs 0.295 and 0.238 s.

How it stays exact and lean:

- One capture per input signature (the shapes of the layer input and of the text conditioning, dtypes, autocast),
  of the whole layer stack as one callable (`_StackCall`): one forward graph of every layer in order, one backward
  graph. The transformer's `_apply_layer` hook (the one AudioCraft's checkpointing and ours use) dispatches: in a
  graphed step the first layer's call replays the stack, and each later layer's call hands its output on as it is.
  Between layers nothing is static: a graph per layer (sessions 12-14) kept each layer's static input, output,
  incoming and outgoing gradient beside the pool (4 x 24 float32 activations at small, ~9 GiB at batch 16 x 30 s,
  +4.3 GiB reserved over the eager step measured) and copied every layer's input and gradient in and out at each
  replay. Every signature uses one memory pool (only one signature runs in a step) and the same static input; what
  each adds is its static output and incoming gradient (`memory_plan.static_bytes`).
- Without checkpointing, `lora.fused_norms`' layers run chained inside the capture (`run_stack`,
  fused_norms.run_chain): each layer's closing residual add with the next layer's norm1 as one op. So do layers on
  `selective` whose feed-forward tail runs outside their checkpoint (no LoRA dropout: `run_selective_chain`), the
  closing op beside the tail and the norm1 output the next checkpoint takes kept as how to make it again.
- Activation checkpointing runs inside the capture (`run_captured`): each layer's backward graph recomputes what its
  plan leaves out (`selective`: norms, GELU, copies; `torch`: the whole layer), so the pool holds a checkpointed
  step's activations (selective: estimated 0.52x of full fine-tuning's peak at small batch 16), but keeps what
  random ops drew (LoRA dropout's output and mask: the generator's state can't be saved and restored inside a
  capture, so a mask drawn again in backward would be another; `recompute.run_as_captured`; attention kernels,
  tagged random for their `dropout_p`, only where it is above 0: `recompute.draws_random`). The memory plan
  estimates the graphed step again as it runs (`recompute.captured_plan`: the masks held) and takes the graphs
  only where that fits (`memory_plan.plan_graphs`).
- Training batches have one token shape (fixed segments and batch size); the text conditioning is padded to the
  longest description of the batch, so its length varies (with AudioCraft's text augmentation, at most steps:
  benchmarks/text_lengths.py). Graphed steps pad it on to a multiple of `lora.graph_text_bucket` tokens, the added
  keys masked in cross-attention (text_buckets: the plain step's keys attended), so a few signatures cover every
  length. Each new one is captured when first seen (a second or two), up to `max_shapes`; a step whose signature is
  beyond that runs eagerly with each layer recomputed in backward (counted: `stats`): the pool holds a step's
  activations for the graphs, so an eager step keeps only its layer inputs beside it (`memory_plan.fallback_bytes`),
  at ~1.3x an eager step's time.
- Only training steps replay (grad enabled, every layer in training mode with no streaming state and no forward
  hooks of its own, CUDA tensors, no attention mask): validation, the memory estimate's fake tensors and AudioCraft's
  token-by-token generation run the layers as without the graphs, through the hook the graphs replaced.
- make_graphed_callables warms a callable up with three whole steps outside the pool: fine for the first signature
  (nothing in the pool yet), but beside the pool of earlier ones it would need a second step's activations. Later
  signatures are warmed up once here instead, each layer recomputed in backward (`_warm_up`), and captured without
  torch's warmup.
- Nothing outside the graphs may change what they read behind their back: the shared adapter casts
  (adapter_casts), refreshed by a Python check, are taken away (each projection casts its adapter inside the graph);
  LoRA dropout masks are drawn inside the graph from CUDA's generator (graph-safe: a new mask at every replay; the
  capture itself runs on a forked generator, so replays draw the masks eager steps would), so replayed dropout masks
  (`dropout_replay`, CPU generator state) are not combined with it (`SpeedSettings.graph_layers_clash`).

A capture that fails (other than for memory) leaves the layers eager with a warning under `lora.graph_layers=auto`
where CUDA's generator still works (a capture that failed midway can leave it in capture mode), and raises under
`true`, with several ranks, or with that generator broken; running out of memory raises, and the solver's advice names
`lora.graph_layers=false`. With several ranks (DDP) the ranks agree on every step whether it is graphed
(`all_ranks_agree`: their adapter gradients must arrive, and be all-reduced, in the same order), a step the stack
can't stand for on one rank only (a layer in eval mode or with a forward hook there alone) included.

Not budgeted: a training step the stack can't stand for (a layer in eval mode, a forward hook) runs as without the
graphs, a whole eager step beside the pool that holds a graphed step's activations.

Gradients: a graph's backward hands autograd its static gradient buffers, which become the parameters' `.grad`
(no copy); they must be cleared with `zero_grad(set_to_none=True)` (torch's default, what AudioCraft's step does)
between backward passes: accumulating two backward passes into them would double the second.

Parameter and state-dict names don't change (the transformer's `_apply_layer` becomes an instance attribute;
`remove` puts back the one it replaced). Tests: tests/test_layer_graphs.py (the dispatch, on CPU, with torch's
capture function stood in for), and
benchmarks/cuda_checks.py (the real graphs on a GPU: six steps over changing text lengths give eager's losses and
gradients bit for bit at exact text lengths, `text_bucket=1`; with LoRA dropout each replay draws a new mask; with
checkpointing inside, eager checkpointing's values), and
tests/test_text_buckets.py (padded text: eager's values up to summation order).
"""
import contextlib
import functools
import logging
import time
import typing as tp
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused_norms, recompute, text_buckets

logger = logging.getLogger(__name__)

__all__ = ['LayerGraphs', 'install', 'remove', 'installed', 'all_ranks_agree']

Key = tp.Tuple[tp.Any, ...]


class _StackCall(nn.Module):
    """Every transformer layer in turn (`run(x, cross)`: LayerGraphs.run_stack), with positional tensors only: what
    make_graphed_callables takes (it replaces this module's forward with the graphs: one forward graph and one backward
    graph of the whole stack per capture)."""

    def __init__(self, layers: tp.Sequence[nn.Module], run: tp.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(layers)  # (their parameters are the graphs')
        self.run = run

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        return self.run(x, cross)


class LayerGraphs:
    """The graphs of one LM's transformer layers, keyed by input signature, and the dispatch of each layer's call
    (`apply_layer`, the transformer's `_apply_layer` hook).

    `capture` is torch.cuda.make_graphed_callables (tests stand something else in on CPU); `device_type` is where
    calls are graphed; `planned` is the hook it replaced (recompute's checkpointing plan, or AudioCraft's), which
    every call the graphs don't take goes through (None: the layer itself); `capture_contexts`: by checkpointing plan
    ('selective', 'torch'), the `context_fn` of the layers on it inside the captures (recompute.capture_contexts)."""

    def __init__(self, layers: tp.Sequence[nn.Module], max_shapes: int = 8,
                 capture: tp.Optional[tp.Callable] = None, pool: tp.Any = None, device_type: str = 'cuda',
                 strict: bool = False,
                 agree: tp.Optional[tp.Callable[[tp.Sequence[int], torch.device], tp.List[int]]] = None,
                 buckets: tp.Optional[text_buckets.TextBuckets] = None,
                 planned: tp.Optional[tp.Callable] = None,
                 capture_contexts: tp.Optional[tp.Dict[str, tp.Callable]] = None):
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.layers = list(layers)
        self.index = {id(layer): index for index, layer in enumerate(self.layers)}
        self.max_shapes = int(max_shapes)
        self.capture = capture or torch.cuda.make_graphed_callables
        self.pool = pool
        self.device_type = device_type
        self.sets: tp.Dict[Key, tp.Tuple[tp.Callable, bool]] = {}  # the stack's graphs, whether its input has a grad
        self.inputs: tp.Dict[Key, torch.Tensor] = {}  # the static stack input, shared by the signatures
        self.active: tp.Optional[Key] = None  # the signature of the step in flight (set by the first layer)
        self.through: tp.Optional[torch.Tensor] = None  # the replayed stack's output, which the later layers pass on
        self.plain = False  # whether this step's layers run as without the graphs (set by the first layer)
        self.stats = {'graphed_calls': 0, 'eager_calls': 0, 'captures': 0, 'capture_seconds': 0.0, 'warmups': 0}
        self.strict = strict  # a capture that fails raises (lora.graph_layers=true), else training goes on eagerly
        self.agree = agree  # with several ranks: the MIN of some flags over the ranks (all_ranks_agree)
        self.failed: tp.Optional[str] = None
        self.on_failure: tp.Optional[tp.Callable[[], tp.Any]] = None  # what undoes install's changes (eager again)
        self.buckets = buckets  # the text conditioning padded to a few lengths, the added keys masked (text_buckets)
        self.planned = planned
        self.capture_contexts = dict(capture_contexts or {})
        self.transformer: tp.Optional[nn.Module] = None  # whose `_apply_layer` this is (install)
        self.replaced: tp.Optional[tp.Callable] = None  # the instance's own hook it replaced (recompute's), if any

    # ------------------------------------------------------------------ dispatch
    def graphable(self, layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict,
                  cross: tp.Optional[torch.Tensor], src_mask: tp.Optional[torch.Tensor]) -> bool:
        """Whether this call is a training step's that the graphs can replay."""
        return (not args and not kwargs and src_mask is None and cross is not None and layer.training
                and torch.is_grad_enabled() and x.device.type == self.device_type
                and cross.device == x.device and not getattr(layer, '_streaming_state', None)
                and type(x) is torch.Tensor and type(cross) is torch.Tensor)  # (no fake/functional tensors)

    def stack_graphable(self) -> bool:
        """Whether the stack's graph can stand for every layer's call of this step: each layer training, with no
        streaming state and no forward hooks of its own (a graph replays kernels: a hook would run at the capture
        only). A step where one can't runs every layer as without the graphs."""
        return all(layer.training and not getattr(layer, '_streaming_state', None)
                   and not getattr(layer, '_is_streaming', False) and not layer._forward_hooks
                   and not layer._forward_pre_hooks for layer in self.layers)

    def signature(self, x: torch.Tensor, cross: torch.Tensor) -> Key:
        device_type = x.device.type
        return (tuple(x.shape), x.dtype, x.requires_grad, tuple(cross.shape), cross.dtype, cross.requires_grad,
                x.device, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def apply_layer(self, layer: nn.Module, x: torch.Tensor, *args,
                    cross_attention_src: tp.Optional[torch.Tensor] = None,
                    src_mask: tp.Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """The transformer's call of `layer`. In a graphed step the first layer replays the whole stack's graph, and
        each later layer hands that output on as it is; other calls run as without the graphs (`planned`)."""
        index = self.index.get(id(layer))
        if index and self.through is not None and x is self.through:  # (the stack's graph ran this layer)
            self.stats['graphed_calls'] += 1
            if index == len(self.layers) - 1:
                self.through = None
            return x
        self.through = None
        if index == 0:  # (a step the stack's graph can't stand for runs every layer as without the graphs)
            self.plain = not (self.graphable(layer, x, args, kwargs, cross_attention_src, src_mask)
                              and self.stack_graphable())
            if self.plain:
                self.active = None
                if (self.agree is not None and torch.is_grad_enabled() and type(x) is torch.Tensor
                        and x.device.type == self.device_type):
                    # (a training step another rank may graph: it must run eagerly too, its gradients in the same
                    # order; the same collective the graphable first layer calls, saying not graphed)
                    self.agree([0, 1], x.device)
        if (index is None or self.failed or self.plain
                or not self.graphable(layer, x, args, kwargs, cross_attention_src, src_mask)):
            if self.planned is None:
                return layer(x, *args, cross_attention_src=cross_attention_src, src_mask=src_mask, **kwargs)
            return self.planned(layer, x, *args, cross_attention_src=cross_attention_src, src_mask=src_mask, **kwargs)
        cross = cross_attention_src
        if self.buckets is not None:
            cross = self.buckets.padded(cross) if index else self.buckets.pad(cross, self.padded_size(x, cross))
        if index == 0:
            key = self.signature(x, cross)
            graphed = key in self.sets or len(self.sets) < self.max_shapes
            capturing = graphed and key not in self.sets
            if self.agree is not None:  # every rank graphs this step, or none does; and who captures
                graphed_everywhere, fewest_not_capturing = self.agree([int(graphed), 1 - int(capturing)], x.device)
                graphed, anyone_captures = bool(graphed_everywhere), not fewest_not_capturing
                capturing = capturing and graphed
            if capturing:
                try:
                    self.sets[key] = self._capture(key, x, cross)
                except Exception as error:
                    if self._capture_failed(error, x.device):  # the text mask refused: graphs at exact lengths
                        return self.apply_layer(layer, x, cross_attention_src=cross_attention_src,
                                                src_mask=src_mask)
                    return self.apply_layer(layer, x, cross_attention_src=cross_attention_src)  # (eager: failed)
            if self.agree is not None and graphed and anyone_captures and not self.agree([1], x.device)[0]:
                raise RuntimeError("Capturing the CUDA graphs of the transformer layers failed on another rank (its "
                                   "log says why). Rerun with lora.graph_layers=false (outside the XP signature: it "
                                   "resumes from the last checkpoint).")
            self.active = key if graphed and key in self.sets else None
        entry = self.sets.get(self.active) if self.active is not None else None
        if index or entry is None or x.requires_grad != entry[1] or tuple(x.shape) != self.active[0]:
            # Eagerly, recomputed in backward: the graphs' pool keeps a step's activations for itself, so an eager
            # step beside it keeps only its layer inputs (torch's checkpoint: the same values, masks included)
            self.stats['eager_calls'] += 1
            # (its own copy of the text mask: a later forward may refill the shared one before this backward)
            mask = self.buckets.mask_for(cross).clone() if self.buckets is not None else None
            return checkpoint(self.run_eager, index, x, cross, mask, use_reentrant=False)
        self.stats['graphed_calls'] += 1
        out = entry[0](x, cross)
        self.through = out if len(self.layers) > 1 else None
        return out

    def padded_size(self, x: torch.Tensor, cross: torch.Tensor) -> int:
        """The text length a step's conditioning is padded to: the next multiple of the bucket, or, when that has no
        graph and there is no room for another, the shortest captured length that holds it (masked keys make any
        longer padding exact), so a step runs eagerly only when its text is longer than every graph's."""
        length = cross.shape[1]
        size = text_buckets.padded_length(length, self.buckets.multiple)
        if len(self.sets) < self.max_shapes:
            return size
        key = self.signature(x, cross)
        fits = [k[3][1] for k in self.sets if k[3][1] >= length and k == _with_text_length(key, k[3][1])]
        return min(fits, default=size)  # (captured lengths are multiples of the bucket: size itself if it has one)

    def run_eager(self, index: int, x: torch.Tensor, cross: torch.Tensor,
                  mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """Layer `index`'s eager forward on a graphable call's tensors (captured, or recomputed in backward: the text
        mask, the shared one or `mask`, is applied in both)."""
        with self._text_masked(cross, mask):
            return self.layers[index](x, cross_attention_src=cross)

    def _text_masked(self, cross: torch.Tensor, mask: tp.Optional[torch.Tensor] = None) -> tp.ContextManager:
        """While inside, cross-attention masks the padded text keys (`lora.graph_text_bucket`; nothing without)."""
        return self.buckets.applied(cross, mask) if self.buckets is not None else contextlib.nullcontext()

    def run_stack(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """The whole stack inside a capture. With no checkpointing and `lora.fused_norms`' layers, each layer's
        closing residual add runs with the next layer's norm1 as one op (fused_norms.run_chain: a layer boundary
        eager steps can't fuse across, its pass over the stream and the sum of its two gradients gone), and on
        `selective` where every layer's feed-forward tail runs outside its checkpoint (`run_selective_chain`); else
        each layer on its plan (`run_captured`)."""
        if fused_norms.chainable(self.layers, cross is not None) and self._chains(x):
            if self.capture_contexts:
                return self.run_selective_chain(x, cross)
            with self._text_masked(cross):
                return fused_norms.run_chain(self.layers, x, cross)
        for index in range(len(self.layers)):
            x = self.run_captured(index, x, cross)
        return x

    def _chains(self, x: torch.Tensor) -> bool:
        """Whether the stack chains each layer's closing add with the next norm1: without checkpointing, or with
        every layer on `selective` and its feed-forward tail outside the checkpoint (recompute.closing_tail), where
        the closing op runs beside it."""
        if not self.capture_contexts:
            return True
        normed = x.detach().requires_grad_()  # (as norm2's output, which needs a gradient where the stack input not)
        return set(self.capture_contexts) == {'selective'} and all(
            recompute.layer_plan(layer, self.transformer) == 'selective' and recompute._tail_fits(layer, normed)
            for layer in self.layers)

    def run_selective_chain(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """The stack on `selective` inside a capture, chained: each layer's checkpoint takes the stream and its norm1
        output (kept as how to make it again from the stream, `recompute.normed_input`: no more memory than the layer
        recomputing its norm1) and ends with the closing add and the next layer's norm1 as one op beside its
        feed-forward tail. Values as `run_captured` layer by layer."""
        context = self.capture_contexts['selective']
        normed = None
        for index, layer in enumerate(self.layers):
            next_norm = self.layers[index + 1].norm1 if index + 1 < len(self.layers) else None
            with recompute.normed_input(layer.norm1, x, normed):
                x, normed = recompute.run_as_captured(context, self._chained, index, x, normed, cross, next_norm)
        return x

    def _chained(self, index: int, x: torch.Tensor, normed: tp.Optional[torch.Tensor], cross: torch.Tensor,
                 next_norm: tp.Optional[nn.Module]) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """Layer `index`'s chained forward (`FusedResidualLayer.chained`) with the text mask applied, in forward and
        when backward recomputes it (as `run_eager`)."""
        with self._text_masked(cross):
            return self.layers[index].chained(x, normed, cross, next_norm)

    def run_captured(self, index: int, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Layer `index` inside the stack's capture, on its checkpointing plan: the backward graph recomputes what the
        plan leaves out (`selective`: norms, GELU, copies; `torch`: the whole layer), drawing no random numbers there
        (`capture_contexts` keep what random ops drew: the generator's state can't be saved and restored inside a
        capture)."""
        context = self.capture_contexts.get(recompute.layer_plan(self.layers[index], self.transformer))
        return recompute.run_as_captured(context, self.run_eager, index, x, cross)

    def _capture_failed(self, error: Exception, device: torch.device) -> bool:
        """After a failed capture: True where the attention kernels refused the text mask (single process), the
        padding then dropped (the graphs captured so far read padded text) for graphs at each batch's own length;
        False where training goes on eagerly (auto); or raises (out of memory, `strict`, several ranks, CUDA's
        generator left in capture mode)."""
        if isinstance(error, text_buckets.TextMaskError) and self.agree is None and _random_numbers_work(device):
            logger.warning("The attention kernels here can't take the text mask (%s); the CUDA graphs of the layers "
                           "go on with each batch's own text length.", error.__cause__ or error)
            text_buckets.remove(self.layers)
            self.buckets = None
            self.release()
            return True
        if self.agree is not None:  # (the other ranks wait in the collective after the capture: tell them)
            self.agree([0], device)
        if isinstance(error, torch.OutOfMemoryError):
            raise error  # (the solver's advice names lora.graph_layers=false)
        if self.strict or not _random_numbers_work(device):
            raise RuntimeError(
                f"Capturing the CUDA graphs of the transformer layers failed ({type(error).__name__}: {error}). "
                "Rerun with lora.graph_layers=false (outside the XP signature: it resumes from the last "
                "checkpoint).") from error
        self.failed = f"{type(error).__name__}: {error}"
        self.release()
        if self.on_failure is not None:
            self.on_failure()
        logger.warning("Capturing the CUDA graphs of the transformer layers failed (%s); training goes on without "
                       "them. Set lora.graph_layers=false to skip them.", self.failed)
        return False

    # ------------------------------------------------------------------ capture
    def _capture(self, key: Key, x: torch.Tensor, cross: torch.Tensor) -> tp.Tuple[tp.Callable, bool]:
        start = time.time()
        shape_key = (tuple(x.shape), x.dtype, x.device, bool(x.requires_grad))
        static_x = self.inputs.get(shape_key)
        if static_x is None:  # the same static input for every signature: one step runs one signature
            static_x = x.detach().clone().requires_grad_(x.requires_grad)
            self.inputs[shape_key] = static_x
        static_cross = cross.detach().clone().requires_grad_(cross.requires_grad)
        stack = _StackCall(self.layers, self.run_stack)
        if self.pool is None and self.device_type == 'cuda':
            self.pool = torch.cuda.graph_pool_handle()
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # (graphs can't hold autocast's cached casts; same values)
        # The warmup and capture draw no random numbers from the run's stream (fork_rng): replays then draw what
        # eager steps would (LoRA dropout masks bit for bit), and a resumed run, which captures again at other
        # steps, draws what the uninterrupted one did.
        devices = [x.device] if x.device.type == 'cuda' else []
        # make_graphed_callables warms a callable up with whole steps outside the pool; beside the pool of earlier
        # signatures (a step's activations) that would need a second step's memory, so later ones are warmed up once
        # here, each layer recomputed in backward (as a step beyond graph_shapes: memory_plan.fallback_bytes)
        warmups = 3 if not self.sets else 0
        try:
            with torch.random.fork_rng(devices=devices), _thread_local_capture(), _sync_expected():
                if not warmups:
                    self._warm_up(static_x, static_cross)
                graphed = self.capture((stack,), ((static_x, static_cross),), num_warmup_iters=warmups,
                                       pool=self.pool)
        finally:
            torch.set_autocast_cache_enabled(cache)
        seconds = time.time() - start
        self.stats['captures'] += 1
        self.stats['capture_seconds'] += seconds
        logger.info("CUDA graphs of %d transformer layers captured for layer input %s and text conditioning %s in "
                    "%.1f s (signature %d of at most %d, lora.graph_shapes)", len(self.layers), list(x.shape),
                    list(cross.shape), seconds, len(self.sets) + 1, self.max_shapes)
        return graphed[0], bool(x.requires_grad)

    def _warm_up(self, x: torch.Tensor, cross: torch.Tensor) -> None:
        """One forward and backward of the stack at a new signature (lazy initialisation at its shapes, as
        make_graphed_callables' warmup does, on a side stream), each layer recomputed in backward: its layer inputs
        beside the pool, not a step's activations."""
        self.stats['warmups'] += 1
        params = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        cuda = x.device.type == 'cuda'
        if cuda:
            torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()) if cuda else contextlib.nullcontext():
            out = x
            for index in range(len(self.layers)):
                out = checkpoint(self.run_eager, index, out, cross, use_reentrant=False)
            inputs = [t for t in (x, cross) if t.requires_grad] + params
            torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
            del out
        if cuda:
            torch.cuda.synchronize()

    def release(self) -> None:
        """Drop every captured graph and static input (their memory goes back to the allocator once nothing else
        holds them)."""
        self.sets.clear()
        self.inputs.clear()
        self.active, self.pool, self.through = None, None, None
        if self.buckets is not None:
            self.buckets.release()

    def summary(self) -> str:
        calls = self.stats['graphed_calls'] + self.stats['eager_calls']
        return (f"{self.stats['graphed_calls']} of {calls} training layer calls replayed as CUDA graphs, "
                f"{len(self.sets)} signature(s) captured in {self.stats['capture_seconds']:.1f} s"
                + (f" (text conditioning padded to multiples of {self.buckets.multiple} tokens)"
                   if self.buckets is not None else '')
                + (f"; {self.stats['eager_calls']} eager and recomputed in backward (text lengths beyond "
                   f"lora.graph_shapes={self.max_shapes})" if self.stats['eager_calls'] else ''))


def _with_text_length(key: Key, length: int) -> Key:
    """Signature `key` with its text conditioning `length` tokens long."""
    cross_shape = key[3]
    return key[:3] + ((cross_shape[0], length) + tuple(cross_shape[2:]),) + key[4:]


def _random_numbers_work(device: torch.device) -> bool:
    """Whether `device`'s generator still draws eagerly: a capture that failed after it began can leave CUDA's
    generator in capture mode (torch's capture_end raises before resetting it), where the next eager dropout fails
    with "Offset increment outside graph capture"; training can't go on eagerly then."""
    try:
        torch.rand(1, device=device)
        return True
    except Exception:
        return False


def all_ranks_agree(values: tp.Sequence[int], device: torch.device) -> tp.List[int]:
    """The smallest of each value over the ranks (one MIN all-reduce; a collective and a host sync).

    With DDP (flashy's eager sync: an all-reduce per parameter as its gradient arrives) every rank must produce the
    adapter gradients in the same order. A graphed layer hands all its gradients at once, an eager one in its own
    order, and ranks see different text lengths, so one rank may be beyond `max_shapes` while another replays: at
    the first layer of each step the ranks agree whether every one of them graphs it (else they all run it eagerly)
    and whether any captures; after a step's captures they agree that all went well (a rank whose capture failed
    says so before it stops, and the others stop too instead of waiting in their next collective)."""
    if torch.distributed.get_backend() == 'gloo':
        device = torch.device('cpu')
    flags = torch.tensor(list(values), dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    with _sync_expected():
        return [int(v) for v in flags.tolist()]


@contextlib.contextmanager
def _sync_expected():
    """AudioCraft's step 1 of each epoch warns at every host-device synchronisation (`set_sync_debug_mode`): the
    graphs' own (a capture, the ranks' agreement) are meant, so they are not reported."""
    if not torch.cuda.is_available():
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def _thread_local_capture():
    """make_graphed_callables captures in cudaStreamCaptureModeGlobal, where a CUDA call of any other thread
    (the DataLoader's pin-memory thread allocating page-locked memory, `lora.pin_memory`) breaks the capture; in
    thread-local mode only this thread's calls are checked. (make_graphed_callables takes no mode: its
    `torch.cuda.graph` is given one for the capture.)"""
    original = torch.cuda.graph
    torch.cuda.graph = functools.partial(original, capture_error_mode='thread_local')  # type: ignore
    try:
        yield
    finally:
        torch.cuda.graph = original  # type: ignore


def install(model: nn.Module, max_shapes: int = 8, capture: tp.Optional[tp.Callable] = None,
            device_type: str = 'cuda', strict: bool = False, distributed: bool = False,
            text_bucket: int = 1) -> LayerGraphs:
    """Route the training calls of every transformer layer of AudioCraft LM `model` through CUDA graphs of the whole
    stack (the transformer's `_apply_layer` becomes an instance attribute: install after the checkpointing plan,
    which it keeps; names, parameters and state dict don't change). Takes the shared
    adapter casts away (graphed projections cast their adapters themselves). `strict`: a failed capture raises
    instead of leaving the layers eager; `distributed`: the ranks agree on every step (`all_ranks_agree`), and a
    failed capture raises (one rank eager while the others replay would pair their gradient all-reduces wrongly);
    `text_bucket` > 1: graphed steps pad the text conditioning to a multiple of that many tokens and mask the added
    keys (text_buckets; left at the exact lengths, with a log line, where the cross-attention can't take the mask).
    Returns the `LayerGraphs`."""
    from .adapter_casts import unshare_adapter_casts
    transformer = getattr(model, 'transformer', None)
    if transformer is None or not hasattr(transformer, 'layers'):
        raise TypeError("lora.graph_layers needs AudioCraft's StreamingTransformer LM (model.transformer.layers).")
    remove(model)
    shared = unshare_adapter_casts(model) > 0
    # The first backward after a capture meets the adapters' AccumulateGrad nodes that the capture's warmup made on
    # its side stream, and torch warns once that it may synchronise there (measured: same values, bit for bit).
    warnings.filterwarnings('ignore', message="The AccumulateGrad node's stream does not match", category=UserWarning)
    buckets = None
    if text_bucket > 1:
        reason = text_buckets.unsupported(transformer.layers)
        if reason:
            logger.info("Text conditioning of graphed steps kept at each batch's length (lora.graph_text_bucket=%d "
                        "needs AudioCraft's masked attention): %s.", text_bucket, reason)
        else:
            buckets = text_buckets.install(transformer.layers, text_bucket)
    graphs = LayerGraphs(transformer.layers, max_shapes=max_shapes, capture=capture, device_type=device_type,
                         strict=strict or distributed, agree=all_ranks_agree if distributed else None,
                         buckets=buckets, planned=transformer._apply_layer,
                         capture_contexts=recompute.capture_contexts(model))
    graphs.transformer, graphs.replaced = transformer, transformer.__dict__.get('_apply_layer')
    if shared:  # a failed capture gives the eager steps their shared adapter casts back
        from .adapter_casts import share_adapter_casts
        graphs.on_failure = functools.partial(share_adapter_casts, model)
    hooked = [index for index, layer in enumerate(graphs.layers) if layer._forward_hooks or layer._forward_pre_hooks]
    if hooked:
        logger.warning("Transformer layers %s have forward hooks, which a CUDA graph can't replay: their training "
                       "steps run without the graphs (lora.graph_layers).", hooked)
    transformer._apply_layer = graphs.apply_layer  # (an instance attribute, as recompute's plans)
    model.__dict__['_lora_layer_graphs'] = graphs
    return graphs


def installed(model: nn.Module) -> tp.Optional[LayerGraphs]:
    """The `LayerGraphs` installed on `model`, if any."""
    return model.__dict__.get('_lora_layer_graphs')


def remove(model: nn.Module) -> bool:
    """Undo `install` (the layers' own forward again; captured graphs are dropped). Returns whether there was one."""
    graphs = model.__dict__.pop('_lora_layer_graphs', None)
    if graphs is None:
        return False
    graphs.transformer.__dict__.pop('_apply_layer', None)
    if graphs.replaced is not None:  # (recompute's plan back)
        graphs.transformer._apply_layer = graphs.replaced
    text_buckets.remove(graphs.layers)
    graphs.release()
    return True
