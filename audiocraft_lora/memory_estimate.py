"""Peak memory of one training step, estimated on fake tensors before training (what `memory_plan` plans with).

`estimate_step` runs the solver's own step on fake tensors (torch's FakeTensorMode: shapes, dtypes and devices, no
data, no kernels): EnCodec's encode of the batch (unless batches come from the token cache), the conditioners, the
LM's `compute_predictions` under the solver's autocast, the cross-entropy and the adapter gradients, with the real
LoRA-injected modules and the checkpointing plan they are on. `PeakTracker` follows every tensor the step creates
until it is freed, so the estimate is the step's peak of live bytes, on top of what is resident (parameters and
buffers of every module, optimizer state). It takes a few seconds on the CPU and no GPU memory.
"""
from dataclasses import dataclass
import contextlib
import typing as tp
import warnings
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .loss import masked_cross_entropy

DESCRIPTION = ' '.join(['trap hip hop beat with 808 sub bass, hi-hats and a dark piano melody'] * 4)  # ~70 tokens
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this


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


def real_tensors():
    """Where a fake tensor mode is active: suspend it (for what needs data: tokenizing, numpy); elsewhere nothing."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


@contextlib.contextmanager
def patterns_on_real_tensors():
    """AudioCraft builds the delay pattern's scatter indexes with numpy, which fake tensors can't: build them real.

    Each `Pattern` binds its two (lru-cached) index builders to the instance when it is created, often before this
    context (`valid_positions`, an earlier step): so the builders are swapped per instance, for the duration of each
    call of the methods that use them."""
    from audiocraft.modules.codebooks_patterns import Pattern
    builders = ('_build_pattern_sequence_scatter_indexes', '_build_reverted_sequence_scatter_indexes')
    users = ('build_pattern_sequence', 'revert_pattern_sequence', 'revert_pattern_logits')
    classes, todo = [], [Pattern]
    while todo:  # Pattern and its subclasses (patterns.IndexSelectPattern): each method where it is defined
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    originals = {(cls, name): cls.__dict__[name] for cls in classes for name in users if name in cls.__dict__}

    def on_real(build):
        def real_build(*args, **kwargs):
            with real_tensors():
                return build(*args, **kwargs)
        return real_build

    def with_real_builders(method):
        def call(self, *args, **kwargs):
            bound = {name: self.__dict__[name] for name in builders if name in self.__dict__}
            for name, build in bound.items():
                self.__dict__[name] = on_real(build)
            try:
                return method(self, *args, **kwargs)
            finally:
                self.__dict__.update(bound)
        return call
    for (cls, name), method in originals.items():
        setattr(cls, name, with_real_builders(method))
    try:
        yield
    finally:
        for (cls, name), method in originals.items():
            setattr(cls, name, method)


@contextlib.contextmanager
def fake_wrapped_parameters(lm: nn.Module, fake_mode: tp.Any):
    """peft's plain path (`ParamWrapper`, the fused q/k/v with `lora.fast_path=false`) re-parametrizes the wrapped
    parameter in place (`set_`) at every forward, which fake tensors refuse on a real parameter: for the estimate, the
    wrapped parameters are fake copies (same shape, dtype, device; no data), put back afterwards."""
    from peft.tuners.lora.layer import ParamWrapper
    from torch._subclasses.fake_tensor import FakeTensor
    swapped = []
    for module in lm.modules():
        if isinstance(module, ParamWrapper):
            base = module.get_base_layer()
            real = base._parameters.get(module.parameter_name)
            if real is not None and not isinstance(real, FakeTensor):
                swapped.append((base, module.parameter_name, real))
                base._parameters[module.parameter_name] = nn.Parameter(fake_mode.from_tensor(real),
                                                                      requires_grad=real.requires_grad)
    try:
        yield
    finally:
        for base, name, real in swapped:
            base._parameters[name] = real


def valid_positions(lm: nn.Module, batch: int, frames: int, device: tp.Any = 'cpu') -> tp.List[torch.Tensor]:
    """Per codebook, the flat [B x T] indexes of the targets the solver's cross-entropy keeps (the delay pattern's
    valid steps; all frames valid), computed on real tensors: fake tensors can't give a boolean mask's size."""
    with real_tensors():
        n_q = lm.num_codebooks
        pattern = lm.pattern_provider.get_pattern(frames)
        zeros = torch.zeros(1, n_q, frames, dtype=torch.long)
        sequence, _, _ = pattern.build_pattern_sequence(zeros, lm.special_token_id, keep_only_valid_steps=True)
        _, _, mask = pattern.revert_pattern_logits(torch.zeros(1, 1, n_q, sequence.shape[-1]), float('nan'),
                                                   keep_only_valid_steps=True)
        return [mask[k].repeat(batch).nonzero().squeeze(1).to(device) for k in range(n_q)]


def cross_entropy_at(logits: torch.Tensor, codes: torch.Tensor, valid: tp.List[torch.Tensor]) -> torch.Tensor:
    """AudioCraft's `MusicGenSolver._compute_cross_entropy` (what its full fine-tune runs; the solver's is
    `loss.masked_cross_entropy`) with index_select at known positions instead of a boolean mask (the same copies and
    saved tensors, shapes known without data)."""
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
    with real_tensors():
        tokenized = lm.condition_provider.tokenize(_attributes(lm, shape.batch, sample_rate))
    tracker = PeakTracker(round_to=_CUDA_BLOCK if device.type == 'cuda' else 1)
    was_training = lm.training
    lm.train()
    try:
        with warnings.catch_warnings(), torch.compiler.set_stance('force_eager'), \
                fake_wrapped_parameters(lm, fake_mode), fake_mode, patterns_on_real_tensors(), tracker:
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
                loss, _ = masked_cross_entropy(out.logits, codes, out.mask)  # (the solver's own: no boolean mask)
            del out, conditions
            grads = torch.autograd.grad(loss, trainable, allow_unused=True) if trainable else ()
            del loss, grads
    finally:
        lm.train(was_training)
    return Estimate(resident=resident, step=tracker.peak)
