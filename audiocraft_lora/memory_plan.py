"""Peak GPU memory of one training step, estimated before training, and the checkpointing plan that fits.

    lora.activation_checkpointing: auto   # the first plan of PLANS whose estimated peak fits the budget
    lora.memory_budget_gib: auto          # auto: what the GPU has for this process | a number of GiB | none

The estimate runs the solver's own step on fake tensors (torch's FakeTensorMode: shapes, dtypes and devices, no
data, no kernels): EnCodec's encode of the batch (unless batches come from the token cache), the conditioners, the
LM's `compute_predictions` under the solver's autocast, the cross-entropy and the adapter gradients, with the real
LoRA-injected modules and the checkpointing plan being tried. `PeakTracker` follows every tensor the step creates
until it is freed, so the estimate is the step's peak of live bytes, on top of what is resident (parameters and
buffers of every module, optimizer state). It takes a few seconds on the CPU and no GPU memory.

How close it is (benchmarks/step_time.py --count-only, against `torch.cuda.max_memory_allocated` on an H200, ours
of session 1 / ../shared/ANCHORS.md): AudioCraft full fine-tuning, small, batch 16 x 30 s: 34.8 estimated vs
35.2 / 36.8 GiB; peft LoRA 31.5 vs 31.9 / 33.5; HF transformers + peft 33.8 vs 34.2; small batch 4: full 12.8 vs
13.0 / 13.5, peft LoRA 9.6 vs 9.8 / 10.3; medium batch 8: full 66.3 vs 66.8 / 67.6, peft LoRA 52.3 vs 52.8 / 53.6,
HF + peft 55.8 vs 56.3 (benchmarks/README.md). A plan is taken when its estimate is at most HEADROOM of the budget
after RESERVE: what the allocator holds beyond the live tensors (cuBLAS/cuDNN workspaces, rounding and fragmentation
of its blocks).
"""
from dataclasses import dataclass
import contextlib
import logging
import math
import typing as tp
import warnings
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logger = logging.getLogger(__name__)

# plans tried by `activation_checkpointing: auto`, least recompute first: (checkpointing, fraction, rest, replay of
# LoRA dropout masks); the second is left out where no fast-path LoRA linear has dropout (it would equal the first)
Plan = tp.Tuple[str, float, str, bool]
PLANS: tp.Tuple[Plan, ...] = (
    ('none', 1.0, 'none', False),
    ('none', 1.0, 'none', True),
    ('selective', 1.0, 'none', False),
    ('torch', 0.5, 'selective', False),
    ('torch', 1.0, 'none', False),
)
HEADROOM = 0.9       # of the budget, for the estimate's error (it runs 1-2% under at MusicGen's sizes)
RESERVE = 2 ** 30    # beyond the tensors: cuBLAS/cuDNN workspaces, allocator blocks (0.5-0.7 GiB seen at batch 4)
DESCRIPTION = ' '.join(['trap hip hop beat with 808 sub bass, hi-hats and a dark piano melody'] * 4)  # ~70 tokens
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this


def plan_name(plan: Plan) -> str:
    mode, fraction, rest, replay = plan
    if mode == 'none':
        return 'none' + (' (LoRA dropout masks replayed)' if replay else '')
    name = mode if fraction >= 1.0 else f'{mode} on {fraction:g} of the layers'
    return name + (f', {rest} on the others' if rest != 'none' and fraction < 1.0 else '')


def plans_for(model: nn.Module) -> tp.List[Plan]:
    """PLANS, without the dropout-replay rung where it would change nothing (no fast-path LoRA dropout)."""
    from .speed import has_fast_dropout
    with_dropout = has_fast_dropout(model)
    return [plan for plan in PLANS if with_dropout or not plan[3]]


def apply_plan(model: nn.Module, plan: Plan) -> dict:
    """Put the LM on `plan`: its activation checkpointing and whether LoRA dropout masks are replayed."""
    from .speed import set_checkpointing, set_dropout_replay
    mode, fraction, rest, replay = plan
    info = set_checkpointing(model, mode, fraction, rest)
    if set_dropout_replay(model, replay) and replay:
        info['dropout_replay'] = True
    return info


class PeakTracker(TorchDispatchMode):
    """Bytes of the tensors created by the ops run in this mode that are still alive, and their peak.

    Each storage is counted once, from the op that creates it until Python frees it (a weak reference's callback);
    what existed before (parameters, inputs) is not counted. Works on fake tensors, which have storages of the right
    size and no memory."""

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = round_to
        self.live: tp.Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        size = -(-storage.nbytes() // self.round_to) * self.round_to
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(leaf.untyped_storage()) for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and id(leaf.untyped_storage()) not in inputs:  # views, in-place: no
                self._track(leaf)
        return out


@dataclass
class StepShape:
    """What one training step on one GPU holds: `batch` items of `frames` token frames; `samples` of audio encoded by
    the compression model first (None: tokens come from the token cache)."""
    batch: int
    frames: int
    samples: tp.Optional[int] = None
    channels: int = 1


@dataclass
class Estimate:
    resident: int   # parameters and buffers of every module + optimizer state
    step: int       # peak of what the step creates (activations, casts, gradients, temporaries)

    @property
    def peak(self) -> int:
        return self.resident + self.step

    @property
    def peak_gib(self) -> float:
        return self.peak / 2 ** 30


def _hidden_modules(module: nn.Module) -> tp.Iterator[nn.Module]:
    """Modules kept out of the module tree (AudioCraft's T5Conditioner stores its T5 in `__dict__`)."""
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, nn.Module) and value not in set(sub.children()):
                yield value


def resident_bytes(modules: tp.Sequence[nn.Module], trainable: tp.Sequence[torch.Tensor],
                   optimizer_state_per_param: int = 2) -> int:
    """Parameters and buffers of `modules` (and of the modules they hide), each tensor counted once, plus Adam's two
    float32 moments per trainable element."""
    seen: tp.Dict[int, int] = {}
    roots = list(modules)
    for module in list(roots):
        roots.extend(_hidden_modules(module))
    for module in roots:
        for tensor in list(module.parameters()) + list(module.buffers()):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values()) + optimizer_state_per_param * 4 * sum(p.numel() for p in trainable)


def _real_tensors():
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


@contextlib.contextmanager
def patterns_on_real_tensors():
    """AudioCraft builds the delay pattern's scatter indexes with numpy, which fake tensors can't: build them real."""
    from audiocraft.modules.codebooks_patterns import Pattern
    names = ('_build_pattern_sequence_scatter_indexes', '_build_reverted_sequence_scatter_indexes')
    originals = {name: getattr(Pattern, name) for name in names}

    def real(original):
        def build(self, *args, **kwargs):
            with _real_tensors():
                return original(self, *args, **kwargs)
        return build
    for name, original in originals.items():
        setattr(Pattern, name, real(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Pattern, name, original)


def valid_positions(lm: nn.Module, batch: int, frames: int, device: tp.Any = 'cpu') -> tp.List[torch.Tensor]:
    """Per codebook, the flat [B x T] indexes of the targets the solver's cross-entropy keeps (the delay pattern's
    valid steps; all frames valid), computed on real tensors: fake tensors can't give a boolean mask's size."""
    with _real_tensors():
        n_q = lm.num_codebooks
        pattern = lm.pattern_provider.get_pattern(frames)
        zeros = torch.zeros(1, n_q, frames, dtype=torch.long)
        sequence, _, _ = pattern.build_pattern_sequence(zeros, lm.special_token_id, keep_only_valid_steps=True)
        _, _, mask = pattern.revert_pattern_logits(torch.zeros(1, 1, n_q, sequence.shape[-1]), float('nan'),
                                                   keep_only_valid_steps=True)
        return [mask[k].repeat(batch).nonzero().squeeze(1).to(device) for k in range(n_q)]


def cross_entropy_at(logits: torch.Tensor, codes: torch.Tensor, valid: tp.List[torch.Tensor]) -> torch.Tensor:
    """`MusicGenSolver._compute_cross_entropy` with index_select at known positions instead of a boolean mask (the
    same copies and saved tensors, shapes known without data)."""
    import torch.nn.functional as F
    ce = torch.zeros([], device=logits.device)
    for k, index in enumerate(valid):
        logits_k = logits[:, k, ...].contiguous().view(-1, logits.size(-1))
        targets_k = codes[:, k, ...].contiguous().view(-1)
        ce = ce + F.cross_entropy(logits_k.index_select(0, index), targets_k.index_select(0, index))
    return ce / len(valid)


def _attributes(lm: nn.Module, batch: int, sample_rate: int) -> tp.List[tp.Any]:
    """Conditioning of a batch: a long description for every text conditioner, a null waveform (as CFG dropout gives)
    for every waveform conditioner."""
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition
    provider = lm.condition_provider
    attributes = []
    for _ in range(batch):
        wav = {name: WavCondition(torch.zeros(1, 1, 1), torch.tensor([0]), [sample_rate], [None], [None])
               for name in provider.wav_conditions}
        attributes.append(ConditioningAttributes(text={name: DESCRIPTION for name in provider.text_conditions},
                                                 wav=wav))
    return attributes


def estimate_step(lm: nn.Module, compression_model: tp.Optional[nn.Module], shape: StepShape,
                  autocast_dtype: tp.Optional[torch.dtype], optimizer_state_per_param: int = 2) -> Estimate:
    """Peak memory of one training step of `lm` (as it is now: LoRA, base dtype, checkpointing plan) at `shape`, on
    the device the LM is on. Changes nothing: no gradient lands on a parameter, no random number is drawn."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    param = next(lm.parameters())
    # a model built on fake tensors (benchmarks/memory_plan.py: any size on any machine) runs in its own mode
    fake_mode = param.fake_mode if isinstance(param, FakeTensor) else FakeTensorMode(allow_non_fake_inputs=True)
    device = param.device
    trainable = [p for p in lm.parameters() if p.requires_grad]
    modules = [lm] + ([compression_model] if compression_model is not None else [])
    resident = resident_bytes(modules, trainable, optimizer_state_per_param)
    sample_rate = int(getattr(compression_model, 'sample_rate', 32000)) if compression_model is not None else 32000
    with _real_tensors():
        tokenized = lm.condition_provider.tokenize(_attributes(lm, shape.batch, sample_rate))
    valid = valid_positions(lm, shape.batch, shape.frames, device)
    tracker = PeakTracker(round_to=_CUDA_BLOCK if device.type == 'cuda' else 1)
    was_training = lm.training
    lm.train()
    try:
        with warnings.catch_warnings(), torch.compiler.set_stance('force_eager'), \
                fake_mode, patterns_on_real_tensors(), tracker:
            warnings.simplefilter('ignore')  # xformers reads fake tensors' data pointers (deprecation warning)
            codes = None
            if shape.samples is not None and compression_model is not None:
                with torch.no_grad():
                    audio = torch.zeros(shape.batch, shape.channels, shape.samples, device=device)
                    codes, _ = compression_model.encode(audio)
                    del audio
                codes = codes[..., :shape.frames]
            if codes is None or codes.shape[-1] != shape.frames:
                codes = torch.zeros(shape.batch, lm.num_codebooks, shape.frames, dtype=torch.long, device=device)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                conditions = lm.condition_provider(tokenized)
                out = lm.compute_predictions(codes, [], conditions)
                loss = cross_entropy_at(out.logits, codes, valid)
            del out, conditions
            grads = torch.autograd.grad(loss, trainable, allow_unused=True) if trainable else ()
            del loss, grads
    finally:
        lm.train(was_training)
    return Estimate(resident=resident, step=tracker.peak)


def device_budget(setting: tp.Any, device: tp.Any) -> tp.Optional[int]:
    """Bytes the training step may use on `device`: `auto` is what the GPU has free plus what this process holds
    (the model is on it already, and counted in the estimate); None where there is nothing to plan (`none`, or
    `auto` off CUDA)."""
    text = str(setting).lower()
    if text in ('none', 'null', 'false'):
        return None
    if text == 'auto':
        device = torch.device(device)
        if device.type != 'cuda':
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    return int(float(setting) * 2 ** 30)


def needed(estimate: Estimate) -> int:
    """The budget a step with this estimate needs: its peak and RESERVE within HEADROOM of it."""
    return int(math.ceil((estimate.peak + RESERVE) / HEADROOM))


def fits(estimate: Estimate, budget: int) -> bool:
    return needed(estimate) <= budget


def largest_batch(estimate: Estimate, batch: int, budget: int) -> int:
    """The batch that fits `budget` if the step's memory scales with the batch (it does: activations are per item)."""
    per_item = estimate.step / max(1, batch)
    return max(0, int((budget * HEADROOM - RESERVE - estimate.resident) // per_item)) if per_item else batch


def describe(estimate: Estimate, budget: tp.Optional[int]) -> str:
    text = (f"{estimate.peak_gib:.2f} GiB (resident {estimate.resident / 2 ** 30:.2f} + step "
            f"{estimate.step / 2 ** 30:.2f})")
    if budget:
        text += f", needs {needed(estimate) / 2 ** 30:.2f} GiB with the margin, of {budget / 2 ** 30:.2f} GiB"
    return text


def ceil_frames(duration: float, frame_rate: float) -> int:
    return int(math.ceil(duration * frame_rate))


def first_fit(model: nn.Module, compression_model: tp.Optional[nn.Module], shape: StepShape,
              autocast_dtype: tp.Optional[torch.dtype], budget: int, plans: tp.Sequence[Plan], apply: bool,
              log: tp.Callable[[Plan, Estimate], None]) -> tp.Tuple[int, Estimate]:
    """Estimate `plans` in order (putting the model on each when `apply`) until one fits `budget`: (its index, its
    estimate), or (len(plans), the last estimate) when none fits. `log` is called with every estimate."""
    estimate = None
    for index, plan in enumerate(plans):
        if apply:
            apply_plan(model, plan)
        estimate = estimate_step(model, compression_model, shape, autocast_dtype)
        log(plan, estimate)
        if fits(estimate, budget):
            return index, estimate
    assert estimate is not None, 'no plan to estimate'
    return len(plans), estimate


def what_fits(estimate: Estimate, shape: StepShape, budget: int, world_size: int = 1) -> str:
    """What to rerun with when `estimate` doesn't fit `budget`: the largest batch that does (for all `world_size`
    GPUs), a bigger GPU when the resident part alone doesn't, or a smaller batch and shorter segments."""
    largest = largest_batch(estimate, shape.batch, budget)
    alone = needed(Estimate(resident=estimate.resident, step=0))
    if largest:
        return f"dataset.batch_size={largest * world_size} (the most that fits)"
    if alone > budget:
        return f"a GPU with more memory (the base and adapter alone need {alone / 2 ** 30:.1f} GiB with the margin)"
    return "a smaller dataset.batch_size and a shorter dataset.segment_duration"
