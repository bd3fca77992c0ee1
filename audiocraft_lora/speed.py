"""Speed and memory settings of LoRA training (the `lora.*` keys below), applied to the LM and the optimizer.

    lora.fast_path: true                  # fast_lora: no W + BA, no frozen-weight gradient (exact; see fast_lora)
    lora.base_dtype: auto                 # auto | float32 | bfloat16 | float16: storage dtype of frozen projections
    lora.fused_optimizer: auto            # auto | true | false: torch's fused AdamW kernel (auto: on CUDA)
    lora.activation_checkpointing: auto   # auto | none | selective | torch: recompute in backward (see below)
    lora.memory_budget_gib: auto          # auto | GiB | none: the memory `auto` plans for (memory_plan)
    lora.checkpoint_fraction: 1.0         # fraction of the layers checkpointed (evenly spaced)
    lora.checkpoint_rest: none            # none | selective: what the other layers do
    lora.compile: none                    # none | inductor | aot_eager | ...: torch.compile each transformer layer
    lora.compile_mode: default            # default | reduce-overhead (CUDA graphs) | max-autotune...: inductor's mode
    lora.pin_memory: auto                 # auto | true | false: page-locked batches (auto: when training on CUDA)
    lora.encode_chunk: auto               # auto | N: EnCodec encodes a batch N items at a time (0: all; encoding.py)
    lora.dropout_replay: false            # LoRA dropout masks drawn again in backward, not kept (auto may set it)
    lora.dropout_kernel: auto             # auto | true | false: LoRA dropout drawn inside the rank-r products
    lora.index_select_logits: true        # the logits' delay pattern reverted with index_select (patterns.py)
    lora.attention_in_autocast_dtype: true  # attention inputs/outputs stay bf16 under autocast (attention_dtype.py)
    lora.fused_norms: true                # norms (+ the residual adds before them) write bf16 in one kernel
    lora.keep_merged_weights: auto        # auto | true | false: keep forward's W + sBA for backward (auto: if it fits)
    lora.graph_layers: auto               # auto | true | false: training layers replayed as CUDA graphs (layer_graphs)
    lora.graph_shapes: 8                  # at most this many input signatures (text lengths) get graphs
    lora.graph_text_bucket: 32            # graphed steps pad the text to a multiple of this, pads masked

`compile` compiles each transformer layer in place (`nn.Module.compile`: parameter and state-dict names don't change)
for training and validation; AudioCraft's token-by-token generation runs eagerly (`eager_generation`). Each layer is
one graph (compiling.py removes AudioCraft's two graph breaks in self-attention); peft's parametrized q/k/v (plain
path) breaks more. `compile_mode: reduce-overhead` (inductor only) replays each layer's kernels as CUDA graphs; the
solver marks the start of every step for them (`cudagraph_mark_step_begin`). On an H100 it was slower than eager at
musicgen-small batch 4 (0.181 vs 0.173 s, session 12); `graph_layers` (below) is the lever for launch-bound steps.
On CPU inductor skips the graphs (same values).

Activation checkpointing trades compute for memory. `torch` recomputes a whole layer in backward (every matmul runs
twice: least memory, ~1.3x the FLOPs). `selective` keeps the outputs of the large matmuls and of attention and
recomputes only what is cheap: layer norms, GELU, copies and the rank-r LoRA updates (no extra matmul FLOPs beyond
those updates; roughly 0.6x the activation memory of no checkpointing; without LoRA dropout, or with `dropout_kernel`,
the feed-forward tail runs outside the checkpoint, so linear2's output isn't kept either: recompute.ff_block). To fit
a memory budget at the least recompute, mix them: `activation_checkpointing: torch` on `checkpoint_fraction` of the
layers and `checkpoint_rest: selective` on the others (e.g. musicgen-medium, batch 16 x 30 s: half of the layers
whole, the rest selective). `auto` (the default) estimates the step's peak memory before training (memory_plan: fake
tensors, a few seconds, no GPU memory) and takes the first of none, none with LoRA dropout masks replayed
(`dropout_replay`, when there is dropout), selective, half whole + half selective, whole that fits `memory_budget_gib`
(auto: the GPU's free memory); off CUDA, with `memory_budget_gib: auto`, it is `none`.

Under autocast the fast path also casts the adapter weights once per optimizer step for the whole model, not at every
projection (adapter_casts; no setting: the same values, ~400 fewer kernel launches a step at musicgen-small).
AudioCraft's packed q/k/v split writes its gradient once, in the projection's layout (packed_qkv; no setting: bit for
bit, one pass over the packed gradient fewer a layer).

`keep_merged_weights` keeps, for each adapted projection that builds `W + s B A` in forward (no LoRA dropout, training
batches), that merged weight until its backward instead of building it again there: one GEMM launch fewer per
projection and step (144 at musicgen-small, 288 at medium: what a batch-4 or 15 s step, bound by launches, pays),
for one [out, in] copy per projection held from forward to backward (the size of the bf16 base: ~0.7 GiB at small,
~3.2 GiB at medium; nothing under whole-layer checkpointing, whose forward runs again in backward). The same values
bit for bit. `auto` keeps them when the memory plan's estimate with them still fits the budget (CUDA), else not.

`graph_layers` records the transformer layers' forward and backward as CUDA graphs (one each way for the whole stack)
at the first training step of each input signature and replays them (layer_graphs.py): eager mode's kernels, no host
cost per kernel (musicgen-small, batch 4 x 30 s on an H100: 0.058 s a step against 0.166 s eager and 0.116 s for
full fine-tuning). Signatures differ by the length of the text conditioning (the batch's longest description), which
graphed steps pad to a multiple of `graph_text_bucket` tokens, masking the added keys in cross-attention
(text_buckets.py: the keys attended are the plain step's); `graph_shapes` of them get graphs (each holds the stack's
static output and incoming gradient: `memory_plan.static_bytes`), later ones run eagerly. Activation checkpointing
(`selective`, `torch`, mixed) recomputes inside the graphs (the masks LoRA dropout drew are kept, not drawn again).
`auto` turns it on on CUDA with the fast path, no `compile` and no replayed dropout masks, for as many signatures as
fit the memory budget next to the step's estimate (a checkpointed step with LoRA dropout estimated again with its
masks kept); `true` asks for it where those hold (refused where they can't).

`fused_norms` (fast path, autocast, no `compile`) runs the transformer layers' norms (norm1, norm_cross, norm2), with
the residual adds in front of norm_cross and norm2, as ops that compute the norm in float32 and write the autocast
dtype, which is all their readers take from it, and whose backward reads the bf16 gradient, sums the stream's two
gradients and writes the branch's bf16 gradient: one Triton kernel each way on CUDA instead of a float32 output, a
cast, a widened gradient, an add, a sum and a cast (fused_norms.py: ~47 GB a step less at musicgen-small b16,
modelled 18 of 150 GPU ms; measured on an H100: 0.174 -> 0.150 s). On CUDA its float32 sums run in another order
than ATen's; elsewhere it is ATen's kernels (bit for bit).

`dropout_kernel` (fast path, no `compile`; CUDA, bf16/fp16) draws LoRA dropout inside the rank-r products
(dropout_kernels.py: Triton kernels, a counter-based generator and a per-call seed): no mask and no dropped-out copy
are written or kept, so LoRA dropout costs the memory of none, and checkpointing and the layers' CUDA graphs keep
nothing for it. The same distribution as torch's dropout, another random stream. `auto` uses them where they pass a
check on the GPU (else torch's dropout, with a warning); `true` stops before training where they can't be used.

`base_dtype: auto` stores the frozen base weights read only by the fast path in the autocast dtype when autocast is
on (what autocast would cast them to at every use: no result changes) and keeps float32 otherwise. A bf16/fp16
base_dtype needs autocast with that same dtype and the fast path; it is refused otherwise. Adapter weights always
stay float32 (they are the optimizer's masters).
"""
from dataclasses import dataclass, field, fields
import logging
import typing as tp

import torch
from torch import nn

from .errors import LoRAConfigError

logger = logging.getLogger(__name__)

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
CHECKPOINTING = ('auto', 'none', 'selective', 'torch')
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


@dataclass
class SpeedSettings:
    """How LoRA training runs (never what it computes): read from the `lora` section of the solver config."""
    fast_path: bool = field(default=True, metadata={
        'help': 'Low-rank products in one autograd node, fused q/k/v LoRA without parametrization (fast_lora).'})
    base_dtype: str = field(default='auto', metadata={
        'help': "Storage dtype of the frozen adapted projections: auto (autocast dtype under autocast, else "
                "float32) | float32 | bfloat16 | float16."})
    fused_optimizer: tp.Any = field(default='auto', metadata={
        'help': "torch's fused AdamW/Adam kernel for the adapter: auto (on CUDA) | true | false."})
    activation_checkpointing: str = field(default='auto', metadata={
        'help': "auto | none | selective | torch. auto: the first of none, none + dropout_replay, selective, half "
                "torch + half selective, torch whose estimated peak memory fits memory_budget_gib (memory_plan). "
                "torch: recompute each transformer layer in backward (AudioCraft's "
                "transformer_lm.checkpointing, non-reentrant so frozen inputs still give adapter gradients). "
                "selective: keep matmul and attention outputs, recompute norms, activations and LoRA updates."})
    compile: str = field(default='none', metadata={
        'help': "none, or a torch.compile backend (inductor on GPU; aot_eager to check correctness on CPU) applied "
                "to each transformer layer for training and validation."})
    compile_mode: str = field(default='default', metadata={
        'help': "torch.compile's mode with compile=inductor: default | reduce-overhead (CUDA graphs of each layer: "
                "no per-kernel host cost) | max-autotune | max-autotune-no-cudagraphs."})
    checkpoint_fraction: float = field(default=1.0, metadata={
        'help': 'With activation checkpointing: the fraction of layers checkpointed, evenly spaced (1.0: all). '
                'Trades memory (activations of the other layers are kept) for less recompute time.'})

    pin_memory: tp.Any = field(default='auto', metadata={
        'help': 'auto | true | false: the data loaders return page-locked batches, copied to the GPU faster '
                '(auto: when the solver runs on CUDA). AudioCraft builds its loaders without.'})
    checkpoint_rest: str = field(default='none', metadata={
        'help': 'none | selective: how the layers left out by checkpoint_fraction run (selective: keep matmul and '
                'attention outputs only).'})
    dropout_replay: tp.Any = field(default=False, metadata={
        'help': "Fast path with LoRA dropout: keep no dropout mask, draw it again in backward from the forward's "
                "generator state (a byte less per input element of out_proj/linear1/linear2, one more dropout pass). "
                "activation_checkpointing=auto turns it on when it is what makes the step fit."})
    dropout_kernel: tp.Any = field(default='auto', metadata={
        'help': "auto | true | false: fast-path LoRA dropout drawn inside the rank-r products by Triton kernels "
                "(dropout_kernels.py; CUDA, bf16/fp16, no compile): no mask or dropped-out input kept, the memory of "
                "no dropout. auto: where they pass their check on the GPU, else torch's dropout; true: required."})
    encode_chunk: tp.Any = field(default='auto', metadata={
        'help': "auto | N: EnCodec tokenizes a training batch N items at a time (0: the whole batch at once, as "
                "AudioCraft does). Same tokens. The whole batch is fastest (its LSTM runs once: 16 x 30 s 0.11 s "
                "on an H200, 0.21 s 4 at a time) and its float32 peak is ~1.15 GiB per 30 s item (18.3 GiB for 16 "
                "x 30 s). auto: the most that fits beside the training step (memory_plan), else 4 (encoding.py)."})
    index_select_logits: bool = field(default=True, metadata={
        'help': "Revert the delay pattern of the LM's logits with index_select (patterns.py): the same values and "
                "gradients, with an index_add in backward instead of AudioCraft's sort-based index_put (~10 ms of an "
                "84 ms musicgen-small step at batch 4 on an H100)."})
    attention_in_autocast_dtype: bool = field(default=True, metadata={
        'help': "Fast path under autocast: the layer norms in front of the attentions return the autocast dtype "
                "(what the q/k/v projection casts their output to anyway), so AudioCraft's attention output is not "
                "cast to float32 and back before out_proj (attention_dtype.py; same values)."})
    fused_norms: bool = field(default=True, metadata={
        'help': "Fast path under autocast, no compile: the transformer's layer norms, with the residual adds in front "
                "of them, compute in float32 and write the autocast dtype (what every reader casts their output to) "
                "in one kernel, and read the bf16 gradient in backward (fused_norms.py; Triton on CUDA, ATen's "
                "kernels elsewhere: the same values up to float32 summation order)."})
    keep_merged_weights: tp.Any = field(default='auto', metadata={
        'help': "auto | true | false: fast-path projections keep the merged W + s B A their forward built for their "
                "backward (one GEMM launch fewer each, one [out, in] copy held until backward). auto: when the "
                "memory plan's estimate with it fits lora.memory_budget_gib (CUDA)."})
    graph_layers: tp.Any = field(default='auto', metadata={
        'help': "auto | true | false: replay the transformer layers' training forward and backward as CUDA graphs "
                "(layer_graphs.py; eager's kernels without their per-kernel host cost). auto: on CUDA, with the "
                "fast path, no compile, no dropout replay, when it fits the memory budget (activation checkpointing "
                "recomputes inside the graphs)."})
    graph_shapes: int = field(default=8, metadata={
        'help': "With graph_layers: how many input signatures (lengths of the batch's text conditioning) get graphs; "
                "steps of other lengths run eagerly. Each holds the layer stack's static output and gradient."})
    graph_text_bucket: int = field(default=32, metadata={
        'help': "With graph_layers: graphed steps pad the text conditioning to a multiple of this many tokens and "
                "mask the added keys in cross-attention (text_buckets.py: the same keys attended, so a few "
                "signatures cover every description length); 1: each batch's own length."})
    memory_budget_gib: tp.Any = field(default='auto', metadata={
        'help': "GPU memory a training step may use, for activation_checkpointing=auto and the start-up estimate: "
                "auto (what the GPU has free) | a number of GiB | none (no estimate; auto means none)."})

    @classmethod
    def from_config(cls, cfg: tp.Any) -> 'SpeedSettings':
        data = {k: v for k, v in cfg.items()} if cfg is not None else {}
        settings = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data and data[f.name] is not None})
        settings.validate()
        return settings

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled layers are replayed as CUDA graphs (inductor's modes that use them, on CUDA tensors)."""
        return self.compile == 'inductor' and self.compile_mode in ('reduce-overhead', 'max-autotune')

    def validate(self) -> None:
        if str(self.base_dtype) not in ('auto', *DTYPES):
            raise LoRAConfigError(f"lora.base_dtype must be auto, float32, bfloat16 or float16, got "
                                  f"{self.base_dtype!r}.")
        for key in ('fused_optimizer', 'pin_memory', 'keep_merged_weights', 'dropout_kernel'):
            if str(getattr(self, key)).lower() not in ('auto', 'true', 'false'):
                raise LoRAConfigError(f"lora.{key} must be auto, true or false, got {getattr(self, key)!r}.")
        if not 0.0 < float(self.checkpoint_fraction) <= 1.0:
            raise LoRAConfigError(f"lora.checkpoint_fraction must be in (0, 1], got {self.checkpoint_fraction!r}.")
        if not isinstance(self.compile, str) or not self.compile:
            raise LoRAConfigError(f"lora.compile must be none or a torch.compile backend name, got {self.compile!r}.")
        if self.compile != 'none':
            import torch._dynamo
            if self.compile not in torch._dynamo.list_backends(exclude_tags=()):
                raise LoRAConfigError(f"lora.compile={self.compile!r} is not a torch.compile backend; choose none or "
                                      f"one of {sorted(torch._dynamo.list_backends(exclude_tags=()))}.")
        if self.compile_mode not in COMPILE_MODES:
            raise LoRAConfigError(f"lora.compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}.")
        if self.compile_mode != 'default' and self.compile != 'inductor':
            raise LoRAConfigError(f"lora.compile_mode={self.compile_mode} is a mode of inductor: set "
                                  f"lora.compile=inductor too (got lora.compile={self.compile}).")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise LoRAConfigError(f"lora.activation_checkpointing must be one of {list(CHECKPOINTING)}, got "
                                  f"{self.activation_checkpointing!r}.")
        if self.checkpoint_rest not in ('none', 'selective'):
            raise LoRAConfigError(f"lora.checkpoint_rest must be none or selective, got {self.checkpoint_rest!r}.")
        if str(self.encode_chunk).lower() != 'auto' and (not isinstance(self.encode_chunk, int) or isinstance(
                self.encode_chunk, bool) or self.encode_chunk < 0):
            raise LoRAConfigError(f"lora.encode_chunk must be auto or a whole number >= 0 (0: the whole batch at "
                                  f"once), got {self.encode_chunk!r}.")
        for key in ('index_select_logits', 'attention_in_autocast_dtype', 'fused_norms'):
            if not isinstance(getattr(self, key), bool):
                raise LoRAConfigError(f"lora.{key} must be true or false, got {getattr(self, key)!r}.")
        if str(self.graph_layers).lower() not in ('auto', 'true', 'false'):
            raise LoRAConfigError(f"lora.graph_layers must be auto, true or false, got {self.graph_layers!r}.")
        if not isinstance(self.graph_shapes, int) or isinstance(self.graph_shapes, bool) or self.graph_shapes < 1:
            raise LoRAConfigError(f"lora.graph_shapes must be a whole number >= 1, got {self.graph_shapes!r}.")
        bucket = self.graph_text_bucket
        if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket < 1:
            raise LoRAConfigError(f"lora.graph_text_bucket must be a whole number >= 1 (1: no padding), "
                                  f"got {bucket!r}.")
        if str(self.graph_layers).lower() == 'true':
            clash = self.graph_layers_clash()
            if clash:
                raise LoRAConfigError(f"lora.graph_layers=true can't be used with {clash}: set lora.graph_layers=auto "
                                      "(it turns itself off where it can't apply) or change that setting.")
        if not isinstance(self.dropout_replay, bool):
            raise LoRAConfigError(f"lora.dropout_replay must be true or false, got {self.dropout_replay!r}.")
        budget = str(self.memory_budget_gib).lower()
        if budget not in ('auto', 'none', 'null'):
            try:
                ok = float(budget) > 0
            except ValueError:
                ok = False
            if not ok:
                raise LoRAConfigError(f"lora.memory_budget_gib must be auto, none or a number of GiB > 0, got "
                                      f"{self.memory_budget_gib!r}.")
        if self.activation_checkpointing == 'auto' and (float(self.checkpoint_fraction) < 1.0
                                                        or self.checkpoint_rest != 'none'):
            raise LoRAConfigError("lora.activation_checkpointing=auto chooses checkpoint_fraction and checkpoint_rest "
                                  "itself: leave them at 1.0 and none, or set activation_checkpointing to torch or "
                                  "selective to choose them.")
        if self.checkpoint_rest != 'none' and self.activation_checkpointing == 'none':
            raise LoRAConfigError("lora.checkpoint_rest applies to the layers left out by lora.checkpoint_fraction: "
                                  "set lora.activation_checkpointing=torch (or selective) as well.")

    def graph_layers_clash(self) -> tp.Optional[str]:
        """The setting that rules CUDA graphs of the layers out, or None. (Activation checkpointing recomputes inside
        them; with LoRA dropout it rules them out too, which the model tells: `memory_plan.plan_graphs`.)"""
        if not self.fast_path:
            return 'lora.fast_path=false (peft\'s parametrized q/k/v is not graphed)'
        if self.compile != 'none':
            return f'lora.compile={self.compile} (torch.compile has its own graphs: lora.compile_mode=reduce-overhead)'
        if self.dropout_replay:
            return 'lora.dropout_replay=true (the masks are replayed from CPU-side generator state)'
        return None

    def resolve_base_dtype(self, autocast: bool, autocast_dtype: torch.dtype) -> torch.dtype:
        """The storage dtype of frozen projections; raises if it can't be used with this autocast setting."""
        if self.base_dtype == 'auto':
            return autocast_dtype if (autocast and self.fast_path) else torch.float32
        dtype = DTYPES[self.base_dtype]
        if dtype is not torch.float32:
            if not self.fast_path:
                raise LoRAConfigError(f"lora.base_dtype={self.base_dtype} needs lora.fast_path=true.")
            if not autocast or dtype is not autocast_dtype:
                raise LoRAConfigError(
                    f"lora.base_dtype={self.base_dtype} needs autocast=true with autocast_dtype={self.base_dtype}: "
                    "frozen weights stored in low precision are only exact where autocast casts them anyway.")
        return dtype


def apply_to_model(model: nn.Module, settings: SpeedSettings, autocast: bool, autocast_dtype: torch.dtype) -> dict:
    """Activation checkpointing, frozen-base storage dtype and the logits' pattern revert, on an LM that already has
    LoRA injected."""
    from .fast_lora import cast_frozen_base
    info: tp.Dict[str, tp.Any] = {}
    transformer = getattr(model, 'transformer', None)
    if settings.activation_checkpointing not in ('none', 'auto'):  # auto: planned once the LM is on its device
        from .recompute import set_checkpointing
        info.update(set_checkpointing(model, settings.activation_checkpointing, float(settings.checkpoint_fraction),
                                      settings.checkpoint_rest))
    if settings.dropout_replay:  # (auto may also turn it on, never off)
        info['dropout_replay'] = set_dropout_replay(model, True)
    if (str(settings.dropout_kernel).lower() != 'false' and settings.fast_path and settings.compile == 'none'
            and autocast and autocast_dtype in (torch.bfloat16, torch.float16)):
        from .dropout_kernels import set_dropout_kernel  # (the device's check: dropout_kernels.check)
        info['dropout_kernel'] = set_dropout_kernel(model, True)
    if str(settings.keep_merged_weights).lower() == 'true' and settings.fast_path:  # (auto: memory_plan decides)
        info['keep_merged_weights'] = set_keep_merged(model, True)
    from .packed_qkv import install as packed_qkv_gradients  # (no setting: the same values, one pass fewer)
    info['packed_qkv_gradients'] = packed_qkv_gradients()
    if settings.index_select_logits:
        from .patterns import use_index_select_logits
        info['index_select_logits'] = use_index_select_logits(model)
    if settings.attention_in_autocast_dtype and settings.fast_path and autocast:
        # (peft's plain path casts the input of its LoRA branch to float32 itself: there it would round differently)
        from .attention_dtype import attention_inputs_in_autocast_dtype
        info['attention_in_autocast_dtype'] = attention_inputs_in_autocast_dtype(model)
    if settings.fused_norms and settings.fast_path and autocast and settings.compile == 'none':
        # (the plain path's LoRA branch casts its input to float32: a bf16 norm would round it; inductor fuses
        # the norms itself, which an opaque op would stop)
        from .fused_norms import install as fuse_norms
        info['fused_norms'] = fuse_norms(model)
    dtype = settings.resolve_base_dtype(autocast, autocast_dtype)
    if dtype is not torch.float32:
        info['base_tensors_cast'] = cast_frozen_base(model, dtype)
    if settings.fast_path and autocast:  # the adapters cast once per step for the whole model (adapter_casts)
        from .adapter_casts import share_adapter_casts
        info['adapter_casts'] = share_adapter_casts(model)
    info['base_dtype'] = str(dtype).replace('torch.', '')
    if settings.compile != 'none':
        if transformer is None or not hasattr(transformer, 'layers'):
            raise LoRAConfigError("lora.compile needs AudioCraft's StreamingTransformer LM.")
        from .compiling import causal_marker_masks
        causal_marker_masks(model)
        mode = {} if settings.compile_mode == 'default' else {'mode': settings.compile_mode}
        for layer in transformer.layers:
            layer.compile(backend=settings.compile, **mode)
        info['compile'] = settings.compile + (f' ({settings.compile_mode})' if mode else '')
    return info


def _has_dropout(linear: nn.Module) -> bool:
    return any(isinstance(d, nn.Dropout) and d.p > 0 for d in linear.lora_dropout.values())


def _fast_linears_with_dropout(model: nn.Module) -> tp.Tuple[tp.List[nn.Module], int]:
    from .fast_lora import FastLoraLinear
    linears = [m for m in model.modules() if isinstance(m, FastLoraLinear)]
    return linears, sum(_has_dropout(m) for m in linears)


def has_fast_dropout(model: nn.Module) -> bool:
    """Whether any fast-path LoRA linear of `model` has dropout drawn by torch (what `dropout_replay` acts on; not
    the `dropout_kernel` ones, which keep no mask)."""
    linears, _ = _fast_linears_with_dropout(model)
    return any(_has_dropout(m) and not m.__dict__.get('_lora_dropout_kernel', False) for m in linears)


def set_dropout_replay(model: nn.Module, replay: bool) -> int:
    """Fast-path LoRA linears of `model` keep no dropout mask (`replay`) or keep it; returns how many have dropout."""
    linears, with_dropout = _fast_linears_with_dropout(model)
    for module in linears:
        module._lora_replay_dropout = bool(replay)
    return with_dropout


def set_keep_merged(model: nn.Module, keep: bool) -> int:
    """Fast-path projections of `model` keep the merged weight their forward built for their backward (`keep`) or
    build it again there; returns how many modules (peft linears and fused q/k/v attentions) were set."""
    from .fast_lora import FastLoraLinear
    from .fused_in_proj import LoRAStreamingMultiheadAttention
    count = 0
    for module in model.modules():
        if isinstance(module, (FastLoraLinear, LoRAStreamingMultiheadAttention)):
            module.__dict__['_lora_keep_merged'] = bool(keep)
            count += 1
    return count


def eager_generation(settings: SpeedSettings):
    """Context in which compiled layers run eagerly: AudioCraft's generation calls them one token at a time with a
    growing streaming cache, which would recompile at nearly every step."""
    import contextlib
    if settings.compile == 'none':
        return contextlib.nullcontext()
    return torch.compiler.set_stance('force_eager')


def pin_loaders(loaders: tp.Mapping[str, tp.Any], settings: SpeedSettings, device: tp.Any) -> tp.List[str]:
    """Turn on `pin_memory` of torch DataLoaders (read when iteration starts, so it can be set after AudioCraft built
    them); returns the names of the loaders changed. Other loaders (the token cache's) are left alone."""
    choice = str(settings.pin_memory).lower()
    if choice == 'false' or (choice == 'auto' and torch.device(device).type != 'cuda'):
        return []
    pinned = []
    for name, loader in loaders.items():
        if isinstance(loader, torch.utils.data.DataLoader) and not loader.pin_memory:
            loader.pin_memory = True
            pinned.append(name)
    return pinned


def optimizer_kwargs(settings: SpeedSettings, params: tp.Sequence[torch.Tensor], optimizer: str) -> dict:
    """Extra keyword arguments for torch's Adam/AdamW (`fused=True` on CUDA with `auto`)."""
    if optimizer not in ('adam', 'adamw'):
        return {}
    choice = str(settings.fused_optimizer).lower()
    on_cuda = all(p.is_cuda for p in params)
    if choice == 'true' or (choice == 'auto' and on_cuda):
        return {'fused': True}
    return {'foreach': True} if choice == 'auto' else {}
