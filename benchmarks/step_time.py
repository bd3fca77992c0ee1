"""One training step of a MusicGen-shaped LM, several ways, in one process: LoRA fast path vs plain vs the peers.

Cases (`--cases`, comma separated):

  full        AudioCraft's LM, every weight trainable (how AudioCraft fine-tunes), AdamW
  lora_plain  our LoRA through peft's own forward + peft `target_parameters` on the fused q/k/v (fast_path=false)
  lora_fast   our LoRA, fast path (fast_lora), frozen base in the autocast dtype, fused AdamW (the solver's defaults)
  lora_fast_ac    lora_fast with AudioCraft's logits revert (lora.index_select_logits=false)
  lora_fast_keep  lora_fast with the merged weights kept from forward to backward (lora.keep_merged_weights=true,
                  what auto does when it fits): one GEMM launch fewer per merged projection
  lora_fast_f32attn lora_fast with AudioCraft's float32 round trip around attention (lora.attention_in_autocast_dtype
                  =false, and lora.fused_norms=false, whose norms hand the attentions bf16 too)
  lora_fast_unfused lora_fast with AudioCraft's layer norms and residual adds (lora.fused_norms=false: float32
                  output, then each reader casts it) instead of fused_norms' one kernel writing bf16; also
                  lora_fast_keep_unfused, lora_graphed_keep_unfused
  lora_fast_concat lora_fast with the rank-r products that share an operand with a base GEMM taken from that GEMM
                  (fast_lora.CONCAT_RANK_GEMMS: the parts named by --concat-rank-gemms)
  lora_ckpt   lora_fast + activation checkpointing (lora.activation_checkpointing=torch)
  lora_ckpt_half  the same, half of the layers recomputed (lora.checkpoint_fraction=0.5)
  lora_sac    lora_fast + selective checkpointing (lora.activation_checkpointing=selective): matmul and attention
              outputs kept, norms/GELU/copies/LoRA updates recomputed
  lora_mixed  lora_fast, half of the layers checkpointed whole, the rest selectively (checkpoint_fraction=0.5,
              checkpoint_rest=selective): the medium-at-batch-16-in-40-GB plan
  lora_compile    lora_fast + torch.compile of each transformer layer (lora.compile: inductor on CUDA, aot_eager on
                  CPU); compilation happens in the untimed warmup steps
  lora_compile_ro lora_compile with torch.compile's mode='reduce-overhead' (lora.compile_mode=reduce-overhead:
                  inductor's kernels under CUDA graphs; slower than eager at small b4 on an H100, session 12);
                  aot_eager on CPU, as lora_compile
  lora_graphed    lora_fast with the transformer layers replayed as CUDA graphs (lora.graph_layers=true,
                  audiocraft_lora/layer_graphs.py: make_graphed_callables of the eager layers: eager's kernels and
                  values, no Python at replay); CUDA only. Its `peak GiB` misses what the graphs' memory pool holds
                  between replays: compare `resv GiB` (torch.cuda.max_memory_reserved)
  lora_graphed_keep lora_graphed with the merged weights kept (what the solver runs on a GPU with LoRA dropout 0)
  lora_graphed_concat lora_graphed with the CONCAT_RANK_GEMMS parts of --concat-rank-gemms (as lora_fast_concat)
  lora_graphed_unfused lora_graphed with AudioCraft's layer norms (lora.fused_norms=false)
  lora_graphed_sac lora_graphed with selective checkpointing recomputed inside the graphs
                  (lora.activation_checkpointing=selective: the memory of lora_sac at the graphs' speed, less the
                  recompute)
  lora_graphed_mixed lora_graphed with lora_mixed's plan (half the layers whole, half selective: the 40 GB plan of
                  medium b16) recomputed inside the graphs
  lora_graphed_exact lora_graphed with each step's own text length (lora.graph_text_bucket=1, before session 13);
                  the graphed cases otherwise pad the text as the solver does (multiples of 32, keys masked)
  lora_fast_tdrop, lora_sac_tdrop, lora_graphed_tdrop, lora_graphed_sac_tdrop: the case with LoRA dropout drawn by
              torch (lora.dropout_kernel=false: mask and dropped-out input kept, or replayed) instead of inside the
              rank-r products (dropout_kernels.py, the default on CUDA; --count-only counts every other case as on a
              GPU, with the kernels); compare with --lora-dropout > 0
  lora_fast_fdrop, lora_sac_fdrop, lora_graphed_fdrop, lora_graphed_sac_fdrop: the case with the dropout kernels'
              backward in one kernel (dropout_kernels.FUSED_BACKWARD: masked_backward_, each decision drawn once)
  hf_lora     HF transformers MusicgenForCausalLM (same dims, random weights) + peft LoRA on q,k,v,o,fc1,fc2
  hf_full     the same HF decoder, full fine-tune
  encode      EnCodec's encoder on the batch's audio (no grad, float32 as the solver runs it; encode_bench: with
              cudnn.benchmark; encode_bf16: under autocast, other tokens): what every AudioCraft solver step adds, and
              what a token cache (`cache.path`) removes from ours; ratios `X/(full+encode)` compare a cached LoRA
              step with AudioCraft's whole step (the whole batch at once, as AudioCraft and lora.encode_chunk=auto
              where it fits; benchmarks/encode_chunks.py compares chunks)

The AudioCraft cases run MusicGenSolver's step: `lm.compute_predictions` (delay pattern, cross-attention on the text
condition), the cross-entropy (`full`: `MusicGenSolver._compute_cross_entropy`; the LoRA cases: our solver's,
`audiocraft_lora/loss.py`, the same values without its slices and boolean gathers), backward, grad clipping, AdamW,
under autocast when `--dtype` is not float32. LoRA is rank 16 on every target (AudioCraft: out_proj, linear1,
linear2 + fused in_proj of self- and cross-attention; HF: q,k,v,o,fc1,fc2), dropout 0 (`--lora-dropout`). Weights are
random: shapes are what matter.

Memory: `saved_MiB` is the bytes of tensors autograd saves for backward in one step (deduplicated by storage,
parameters excluded), a deterministic proxy for activation memory that works on CPU; `state_MiB` is parameters +
gradients + optimizer state; on CUDA `peak_GiB` is `torch.cuda.max_memory_allocated`, with --count-only the
estimate of it by audiocraft_lora.memory_estimate.PeakTracker (every tensor the step creates, followed until freed, on
top of the resident parameters) that `lora.activation_checkpointing=auto` plans with. With --count-only the CUDA-only
`lora_graphed*` cases count their step as it runs inside the captures (`recompute.captured_plan`: under a
checkpointing plan what LoRA dropout drew is kept, not drawn again; the graphs' static tensors and the cross-layer
add + norm of `fused_norms.run_chain` not counted).

    python benchmarks/step_time.py --device cpu                                # tiny CPU smoke run
    python benchmarks/step_time.py --device cpu --scale xsmall --batch 4 --frames 250 --iters 3
    python benchmarks/step_time.py --scale small --batch 16 --frames 1500 --device cuda --json out.json
    python benchmarks/step_time.py --scale medium --batch 16 --frames 1500 --cases lora_ckpt,lora_fast
"""
import argparse
import contextlib
import copy
import gc
import itertools
import json
import time
import typing as tp

import torch

from audiocraft_lora.loss import masked_cross_entropy
from audiocraft_lora.memory_estimate import (PeakTracker, cross_entropy_at, patterns_on_real_tensors, real_tensors,
                                             valid_positions)

SCALES = {  # dim, heads, layers (MusicGen's model_scale presets)
    'tiny': (64, 4, 2),
    'xsmall': (256, 8, 4),
    # musicgen-small's 24 layers at width 16: a step of nothing but kernel launches and Python, what bounds a GPU
    # step at small batches; on a CPU its `launches` column is that count (run with --frames 150 or more: training
    # rows, so the fast path takes its merged-weight GEMMs as on a GPU)
    'small_narrow': (16, 2, 24),
    'small': (1024, 16, 24),
    'medium': (1536, 24, 48),
    'large': (2048, 32, 48),
}
CASES = ('full', 'lora_plain', 'lora_fast', 'lora_fast_ac', 'lora_fast_keep', 'lora_fast_f32attn', 'lora_fast_unfused',
         'lora_fast_keep_unfused', 'lora_fast_concat', 'lora_ckpt', 'lora_ckpt_half', 'lora_sac', 'lora_mixed',
         'lora_compile', 'lora_compile_ro', 'lora_graphed', 'lora_graphed_keep', 'lora_graphed_concat',
         'lora_graphed_exact', 'lora_graphed_unfused', 'lora_graphed_keep_unfused', 'lora_graphed_sac',
         'lora_graphed_mixed', 'lora_fast_tdrop', 'lora_sac_tdrop', 'lora_graphed_tdrop', 'lora_graphed_sac_tdrop',
         'lora_fast_fdrop', 'lora_sac_fdrop', 'lora_graphed_fdrop', 'lora_graphed_sac_fdrop', 'hf_lora', 'hf_full',
         'encode', 'encode_bench', 'encode_bf16')
CUDA_ONLY = ('lora_graphed', 'lora_graphed_keep', 'lora_graphed_concat', 'lora_graphed_exact', 'lora_graphed_unfused',
             'lora_graphed_keep_unfused', 'lora_graphed_sac', 'lora_graphed_mixed', 'lora_graphed_tdrop',
             'lora_graphed_sac_tdrop', 'lora_graphed_fdrop', 'lora_graphed_sac_fdrop')
TORCH_DROPOUT = '_tdrop'  # a case's suffix: LoRA dropout by torch (lora.dropout_kernel=false), the rest as the case
FUSED_DROPOUT_BACKWARD = '_fdrop'  # a case's suffix: dropout_kernels.FUSED_BACKWARD, the rest as the case
RANK = 16
TEXT_TOKENS = 16  # text conditioning length of the HF cases (a short description through T5)


def build_ac_lm(scale: str, card: int, device: str):
    from omegaconf import OmegaConf
    from audiocraft.models import builders
    from audiocraft_lora.debug_base import LM_CFG
    dim, heads, layers = SCALES[scale]
    cfg = copy.deepcopy(LM_CFG)
    cfg['transformer_lm'].update(dim=dim, num_heads=heads, num_layers=layers, card=card)
    cfg['conditioners']['description']['lut'].update(dim=dim, n_bins=512)
    cfg['device'] = device
    lm = builders.get_lm_model(OmegaConf.create(cfg)).to(device)
    # MusicGen's T5 text encoder is frozen; so is the lookup table standing in for it
    lm.condition_provider.conditioners['description'].embed.weight.requires_grad_(False)
    return lm


def build_encoder(args, variant: str = 'encode') -> tp.Tuple[torch.nn.Module, tp.Callable[[], torch.Tensor]]:
    """The `encode` cases: MusicGen's EnCodec 32 kHz encoder (SEANet, 64 filters, ratios 8-5-4-4, 2 LSTM layers;
    random weights; the 4-codebook quantizer, ~1% of its FLOPs, left out) on the batch's audio, frozen. An AudioCraft
    solver runs it at every training step (with a token cache, `cache.path`, ours does not): `encode` as the solver
    runs it (float32 outside autocast, torch's default TF32 for convolutions, the whole batch at once: AudioCraft's
    way and `lora.encode_chunk=auto`'s where it fits); `encode_bench` the same with cudnn.benchmark (cuDNN times its
    algorithms for these shapes once); `encode_bf16` under the step's autocast (other tokens: a speed probe only)."""
    from audiocraft.modules import SEANetEncoder
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # weight_norm deprecation
        encoder = SEANetEncoder(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                                lstm=2, norm='weight_norm', causal=False, pad_mode='constant', true_skip=True,
                                compress=2).to(args.device).eval()
    encoder.requires_grad_(False)
    audio = torch.randn(args.batch, 1, args.frames * 640, device=args.device)  # 640 samples per frame at 32 kHz
    dtype = args.autocast_dtype if variant == 'encode_bf16' else None
    chunk = args.batch

    def encode():
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = variant == 'encode_bench'
        try:
            with torch.no_grad(), torch.autocast(device_type=args.device, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
                return sum(encoder(part).float().mean() for part in audio.split(chunk))
        finally:
            torch.backends.cudnn.benchmark = benchmark
    return encoder, encode


def build_hf_lm(scale: str, card: int, device: str):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    dim, heads, layers = SCALES[scale]
    conf = MusicgenDecoderConfig(vocab_size=card, max_position_embeddings=4096, num_hidden_layers=layers,
                                 ffn_dim=4 * dim, num_attention_heads=heads, hidden_size=dim, num_codebooks=4,
                                 activation_function='gelu', dropout=0.0, attention_dropout=0.0,
                                 activation_dropout=0.0, pad_token_id=card - 1, bos_token_id=card - 1)
    with torch.device(device):  # random init on the device: fast for medium/large
        try:
            return MusicgenForCausalLM._from_config(conf, attn_implementation='sdpa')
        except Exception:  # older transformers
            return MusicgenForCausalLM(conf)


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward, deduplicated by storage, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        # keyed by the storage object (`_cdata`), not its data pointer: fake tensors (--count-only) all point at 0
        self.exclude = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: tp.Dict[int, int] = {}

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude:  # the packed tensor keeps its storage (and key) alive until backward
            self.seen[storage._cdata] = storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def hooks(self):
        """Count what autograd saves in this context, and what selective checkpointing caches (its dispatch mode
        keeps matmul/attention outputs aside from autograd: read them before backward consumes them)."""
        from torch.utils import checkpoint as ckpt
        from torch.utils._pytree import tree_leaves
        modes: tp.List[tp.Any] = []
        original = ckpt._CachingTorchDispatchMode.__init__

        def init(mode, *args, **kwargs):
            original(mode, *args, **kwargs)
            modes.append(mode)
        ckpt._CachingTorchDispatchMode.__init__ = init  # type: ignore
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            ckpt._CachingTorchDispatchMode.__init__ = original  # type: ignore
        for mode in modes:
            for cached in tree_leaves(list(mode.storage.values())):
                value = getattr(cached, 'val', None)
                if isinstance(value, torch.Tensor):
                    self.pack(value)

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / 2 ** 20


class LaunchCounter:
    """ATen ops that run a kernel (views, reshapes and allocations left out), forward + backward + optimizer: what a
    step launches on a GPU, and what a CPU-bound (small-batch) GPU step pays for one by one."""
    METADATA = {'view', '_unsafe_view', 'reshape', '_reshape_alias', 'permute', 't', 'transpose', 'slice', 'select',
                'split', 'split_with_sizes', 'unbind', 'alias', 'squeeze', 'unsqueeze', 'expand', 'as_strided',
                'detach', 'empty', 'empty_like', 'new_empty', 'empty_strided', 'new_empty_strided', 'lift_fresh',
                'unflatten', '_record_function_enter_new', '_record_function_exit',
                '_local_scalar_dense'}  # `.item()` of AdamW's per-parameter step counters: CPU tensors, no kernel

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(mode, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ not in self.METADATA:
                    self.count += 1
                return func(*args, **(kwargs or {}))
        self.count, self.mode = 0, Mode()


def make_case(case: str, args) -> tp.Tuple[torch.nn.Module, tp.Callable[[], torch.Tensor]]:
    """The model of a case and a closure computing its loss (forward only)."""
    from audiocraft_lora.lora import LoRASettings, inject_lora
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    from audiocraft_lora import dropout_kernels, fast_lora, packed_qkv
    torch_dropout = case.endswith(TORCH_DROPOUT)
    case = case[:-len(TORCH_DROPOUT)] if torch_dropout else case
    dropout_kernels.FUSED_BACKWARD = case.endswith(FUSED_DROPOUT_BACKWARD)  # (read in backward: for the whole case)
    case = case[:-len(FUSED_DROPOUT_BACKWARD)] if dropout_kernels.FUSED_BACKWARD else case
    fast_lora.CONCAT_RANK_GEMMS = frozenset(  # (read in forward and backward: set for the whole case)
        getattr(args, 'concat_rank_gemms', ','.join(fast_lora.CONCAT_PARTS)).split(',') if case.endswith('_concat')
        else ())
    device, dtype = args.device, args.autocast_dtype
    torch.manual_seed(0)
    if case.startswith('encode'):
        return build_encoder(args, case)
    codes = torch.randint(0, args.card, (args.batch, 4, args.frames), device=device)
    if case.startswith('hf_'):
        model = build_hf_lm(args.scale, args.card, device)
        if case == 'hf_lora':
            import peft
            config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=getattr(args, 'lora_dropout', 0.0),
                                     target_modules=['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'])
            model = peft.get_peft_model(model, config)
        input_ids = codes.reshape(args.batch * 4, args.frames)
        labels = codes.transpose(1, 2)
        text = torch.randn(args.batch, TEXT_TOKENS, SCALES[args.scale][0], device=device)

        def hf_loss():
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model(input_ids=input_ids, encoder_hidden_states=text, labels=labels).loss
        return model, hf_loss

    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver
    lm = build_ac_lm(args.scale, args.card, device)
    packed_qkv.install(False)  # (AudioCraft's full fine-tune as it is; apply_to_model below installs it for LoRA)
    captured = False
    if case != 'full':
        fast = case != 'lora_plain'
        dropout = getattr(args, 'lora_dropout', 0.0)
        inject_lora(lm, LoRASettings(rank=RANK, alpha=2 * RANK, dropout=dropout), fast_path=fast)
        # lora_plain: peft + AudioCraft as they are; lora_fast_ac: the fast path with AudioCraft's logits revert
        speed = SpeedSettings(fast_path=fast, base_dtype='auto' if fast else 'float32',
                              index_select_logits=case not in ('lora_plain', 'lora_fast_ac'),
                              attention_in_autocast_dtype=case != 'lora_fast_f32attn',
                              # (the fused norms hand the attentions bf16 themselves: off for the float32 round trip)
                              fused_norms=not case.endswith('_unfused') and case != 'lora_fast_f32attn',
                              keep_merged_weights=case.startswith(('lora_fast_keep', 'lora_graphed_keep')),
                              activation_checkpointing='torch' if case in ('lora_ckpt', 'lora_ckpt_half', 'lora_mixed',
                                                                           'lora_graphed_mixed')
                              else 'selective' if case in ('lora_sac', 'lora_graphed_sac') else 'none',
                              checkpoint_fraction=0.5 if case in ('lora_ckpt_half', 'lora_mixed', 'lora_graphed_mixed')
                              else 1.0,
                              checkpoint_rest='selective' if case in ('lora_mixed', 'lora_graphed_mixed') else 'none',
                              compile=('inductor' if device == 'cuda' else 'aot_eager')
                              if case in ('lora_compile', 'lora_compile_ro') else 'none',
                              compile_mode='reduce-overhead' if case == 'lora_compile_ro' and device == 'cuda'
                              else 'default', dropout_kernel='false' if torch_dropout else 'auto')
        info = apply_to_model(lm, speed, autocast=dtype is not None, autocast_dtype=dtype or torch.float32)
        if case == 'lora_plain':  # (as it is: xformers' stack of the q/k/v gradients, AudioCraft's loss below)
            packed_qkv.install(False)
        if device == 'cuda' or not getattr(args, 'count_only', False):  # (as the solver; --count-only: as on a GPU)
            dropout_kernels.check(lm, device)
        if info.get('fused_norms') and device == 'cuda':  # (as the solver: checked before any capture)
            from audiocraft_lora.fused_norms import check_kernels
            check_kernels(lm)
        if case in CUDA_ONLY and getattr(args, 'count_only', False):
            captured = True  # (--count-only: the step as it runs inside the captures, below; no graphs installed)
        elif case in CUDA_ONLY:
            if device != 'cuda':
                raise RuntimeError(f'{case} needs a CUDA device (CUDA graphs; --count-only counts its step)')
            from audiocraft_lora import layer_graphs
            # (the solver's graph_shapes, and the text padded as it pads it: lora.graph_text_bucket, keys masked)
            defaults = SpeedSettings()
            layer_graphs.install(lm, max_shapes=defaults.graph_shapes,
                                 text_bucket=1 if case == 'lora_graphed_exact' else defaults.graph_text_bucket)
    attributes = [ConditioningAttributes(text={'description': f'trap beat {i}'}) for i in range(args.batch)]
    with real_tensors():  # tokenizing reads lengths (`.item()`), which fake tensors can't
        tokenized = lm.condition_provider.tokenize(attributes)

    # AudioCraft's full fine-tune and lora_plain: its cross-entropy (--count-only: at positions known without data, as
    # a boolean mask's size needs data); the other LoRA cases: the solver's (loss.py: no boolean mask)
    valid = valid_positions(lm, args.batch, args.frames) if getattr(args, 'count_only', False) else None
    audiocraft_ce = case in ('full', 'lora_plain')

    lengths = itertools.cycle(text_lengths(args) or [None])

    def ac_loss():
        with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
            condition_tensors = lm.condition_provider(tokenized)
            length = next(lengths)
            if length is not None:  # (--text-lengths: the one-token description repeated to this step's length)
                embedding, mask = condition_tensors['description']
                condition_tensors['description'] = (embedding.repeat(1, length, 1), mask.repeat(1, length))
            out = lm.compute_predictions(codes, [], condition_tensors)
            if not audiocraft_ce:
                ce, _ = masked_cross_entropy(out.logits, codes, out.mask)
            elif valid is None:
                ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
            else:
                ce = cross_entropy_at(out.logits, codes, valid)
        return ce
    if captured:  # each layer's checkpointing as inside a capture: what random ops drew kept, not drawn again
        from audiocraft_lora.recompute import captured_plan

        def captured_loss():
            with captured_plan(lm):
                return ac_loss()
        return lm, captured_loss
    return lm, ac_loss


def text_lengths(args) -> tp.List[int]:
    """--text-lengths: the AudioCraft cases' text-conditioning length at each step, cycled."""
    given = getattr(args, 'text_lengths', None)
    return [int(n) for n in given.split(',')] if given else []


def _optimizer(params: tp.List[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
    dummy = [torch.zeros(1, requires_grad=True)]  # AdamW refuses an empty list (the `encode` case)
    return torch.optim.AdamW(params or dummy, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, **kwargs)


def state_bytes(model: torch.nn.Module, params: tp.List[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients of the trainable ones + optimizer state."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.numel() * p.element_size() for p in params)
    total += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    return total


@contextlib.contextmanager
def _cpu_moves_are_noops():
    """`Module.to(...)` that would change nothing (every tensor already on the CPU in that dtype) returns the module.
    Builders and peft call it, and on fake tensors `Module._apply` always swaps parameters, which fails (fake tensors
    carry a weak reference)."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        same_dtype = dtype is None or all(t.dtype == dtype for t in self.parameters() if t.is_floating_point())
        if same_dtype and (device is None or device.type == 'cpu'):
            return self
        return original(self, *args, **kwargs)
    torch.nn.Module.to = to  # type: ignore
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore


def kernels_as_on_gpu():
    """CPU fake tensors taking the GPU's LoRA dropout path (dropout_kernels: their fake ops, no mask kept)."""
    from unittest import mock
    from audiocraft_lora import dropout_kernels
    return mock.patch.object(dropout_kernels, '_on_gpu', lambda t: True)


def count(case: str, args) -> dict:
    """One step on fake tensors (shapes only, no data, no time): FLOPs, saved activations and state at any shape on
    any machine. Autocast is CPU autocast, which keeps layer norms in the autocast dtype where CUDA's runs them in
    float32 (their outputs are not saved, so saved bytes barely differ)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    if case in ('lora_compile', 'lora_compile_ro'):
        raise RuntimeError('torch.compile is not counted on fake tensors; measure it on a GPU')
    with FakeTensorMode(allow_non_fake_inputs=True), _cpu_moves_are_noops(), patterns_on_real_tensors(), \
            kernels_as_on_gpu():
        model, loss_fn = make_case(case, args)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, foreach=True)
        saved = SavedTensorBytes(model)
        with FlopCounterMode(display=False) as flop_counter:
            with saved.hooks():
                loss = loss_fn()
            if params:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        del loss
        # the peak of a second step (optimizer state held), apart: FlopCounterMode keeps tensors alive in backward
        resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        resident += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor))
        with PeakTracker() as tracker:
            loss = loss_fn()
            if params:
                loss.backward()
            del loss
        state = state_bytes(model, params, optimizer)
        return {'case': case, 'step_s': None, 'frames_per_s': None, 'saved_MiB': saved.mib, 'launches': None,
                'state_MiB': state / 2 ** 20, 'gflop': flop_counter.get_total_flops() / 1e9,
                'trainable_M': sum(p.numel() for p in params) / 1e6, 'loss': None,
                'peak_GiB': (resident + tracker.peak) / 2 ** 30,
                'state_plus_saved_GiB': (state + sum(saved.seen.values())) / 2 ** 30}


def measure(case: str, args) -> dict:
    at_start = 0.0
    if args.device == 'cuda':  # (what an earlier case left reserved would count in this one's `resv GiB`)
        gc.collect()
        torch.cuda.empty_cache()
        at_start = torch.cuda.memory_reserved() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    model, loss_fn = make_case(case, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the solver's choice (speed.optimizer_kwargs): fused on CUDA; every case gets the same kernel for fairness
    fused = {'fused': True} if args.device == 'cuda' else {'foreach': True}
    optimizer = _optimizer(params, **fused)
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    saved = SavedTensorBytes(model)

    def step(count_saved: bool = False):
        if case == 'lora_compile_ro':  # CUDA graphs: a new iteration (the last one's graph outputs may be reused)
            torch.compiler.cudagraph_mark_step_begin()
        if count_saved:
            with saved.hooks():
                loss = loss_fn()
        else:
            loss = loss_fn()
        if params:  # (the `encode` case has nothing to train)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    step(count_saved=True)
    from torch.utils.flop_counter import FlopCounterMode
    # (not for compiled cases: their kernels don't pass the dispatcher, and a dispatch mode there may recompile)
    launches = LaunchCounter() if 'compile' not in case else None
    with FlopCounterMode(display=False) as flop_counter, (launches.mode if launches else contextlib.nullcontext()):
        step()  # FLOPs of forward + backward, launches
    for _ in range(max(args.warmup - 2, len(text_lengths(args)) - 1)):  # (every length once: captures untimed)
        step()
    sync()
    # `resv GiB`: the most reserved from the case's start (its captures included), less what was reserved before it
    reserved_before_timing = torch.cuda.max_memory_reserved() / 2 ** 30 if args.device == 'cuda' else None
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    mean_s = sum(times) / len(times)
    times.sort()
    # median on CUDA; on a (possibly shared) CPU the minimum is the least noisy estimate; the mean with
    # --text-lengths (steps of several lengths, some beyond the graphs: what a run of them costs)
    step_s = mean_s if text_lengths(args) else times[len(times) // 2] if args.device == 'cuda' else times[0]
    estimate = None
    if getattr(args, 'estimate', False) and not case.startswith(('hf_', 'encode')):
        # what `lora.activation_checkpointing=auto` would plan with, for this very model (compare with peak_GiB)
        from audiocraft_lora.memory_estimate import StepShape, estimate_step
        try:
            estimate = estimate_step(model, None, StepShape(args.batch, args.frames), args.autocast_dtype).peak_gib
        except Exception as error:  # keep the measured step; say why there is no estimate
            print(f"{case}: no estimate ({type(error).__name__}: {str(error)[:200]})", flush=True)
    result = {'case': case, 'step_s': step_s, 'frames_per_s': args.batch * args.frames / step_s,
              'est_GiB': estimate,
              'saved_MiB': saved.mib, 'state_MiB': state_bytes(model, params, optimizer) / 2 ** 20,
              'gflop': flop_counter.get_total_flops() / 1e9, 'launches': launches.count if launches else None,
              'trainable_M': sum(p.numel() for p in params) / 1e6, 'loss': float(loss.detach()),
              'peak_GiB': torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == 'cuda' else None,
              'reserved_GiB': (max(reserved_before_timing, torch.cuda.max_memory_reserved() / 2 ** 30) - at_start
                               if args.device == 'cuda' else None),
              'reserved_at_start_GiB': at_start if args.device == 'cuda' else None}
    from audiocraft_lora import layer_graphs
    layer_graphs.remove(model)  # (the graphs' pool would stay allocated into the next case)
    del model, optimizer, params, loss_fn, saved, loss, step
    gc.collect()
    if args.device == 'cuda':
        torch.cuda.empty_cache()
    return result


def ratios(results: tp.Dict[str, dict]) -> tp.Dict[str, float]:
    out = {}
    encode = results.get('encode')
    for case in ('lora_fast', 'lora_sac', 'lora_mixed', 'lora_compile', 'lora_compile_ro', 'lora_graphed'):
        if encode and case in results and 'full' in results:
            a, b = results[case], results['full']
            if a['step_s'] is not None:
                out[f'{case}/(full+encode) step'] = a['step_s'] / (b['step_s'] + encode['step_s'])
            out[f'{case}/(full+encode) flop'] = a['gflop'] / (b['gflop'] + encode['gflop'])
    for case in ('lora_fast', 'lora_fast_ac', 'lora_fast_keep', 'lora_fast_f32attn', 'lora_fast_unfused',
                 'lora_fast_keep_unfused', 'lora_graphed_keep_unfused',
                 'lora_fast_concat', 'lora_ckpt', 'lora_ckpt_half', 'lora_sac', 'lora_mixed', 'lora_compile',
                 'lora_compile_ro', 'lora_graphed', 'lora_graphed_keep', 'lora_graphed_concat', 'lora_graphed_exact',
                 'lora_graphed_unfused', 'lora_graphed_sac', 'lora_graphed_mixed', 'lora_fast_tdrop', 'lora_sac_tdrop',
                 'lora_graphed_tdrop', 'lora_graphed_sac_tdrop', 'lora_fast_fdrop', 'lora_sac_fdrop',
                 'lora_graphed_fdrop', 'lora_graphed_sac_fdrop'):
        for ref in ('full', 'lora_plain', 'hf_lora', 'hf_full', 'lora_fast', 'lora_graphed', 'lora_fast_keep',
                    'lora_graphed_keep', 'lora_sac', 'lora_graphed_sac'):
            if case in results and ref in results and case != ref:
                a, b = results[case], results[ref]
                if a['step_s'] is not None:
                    out[f'{case}/{ref} step'] = a['step_s'] / b['step_s']
                out[f'{case}/{ref} flop'] = a['gflop'] / b['gflop']
                for key, name in (('peak_GiB', 'peak'), ('reserved_GiB', 'reserved'),
                                  ('state_plus_saved_GiB', 'state+saved'),
                                  ('saved_MiB', 'saved')):
                    if a.get(key) is not None and b.get(key):
                        out[f'{case}/{ref} {name}'] = a[key] / b[key]
                        break
                if a.get('launches') and b.get('launches'):
                    out[f'{case}/{ref} launches'] = a['launches'] / b['launches']
    return out


def main(argv: tp.Optional[tp.List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scale', default='tiny', choices=sorted(SCALES))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--frames', type=int, default=250, help='token frames per item (50/s at 32 kHz)')
    parser.add_argument('--card', type=int, default=2048)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                        help='autocast dtype (default: bfloat16 on CUDA, float32 = no autocast on CPU)')
    parser.add_argument('--cases', default=None, help='comma separated (default: all; the CUDA-only ones on CUDA)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps (the first two count memory, FLOPs)')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--json', default=None, help='also write the results here')
    parser.add_argument('--lora-dropout', type=float, default=0.0, help='LoRA dropout of the lora/hf_lora cases')
    parser.add_argument('--text-lengths', default=None,
                        help="comma separated text-conditioning lengths the AudioCraft cases' steps cycle through "
                             "(default: one token); warmup covers each once, step_s is then the mean over --iters")
    parser.add_argument('--concat-rank-gemms', default='forward,dropout_forward,backward',
                        help="the lora_fast_concat / lora_graphed_concat cases' fast_lora.CONCAT_RANK_GEMMS parts")
    parser.add_argument('--estimate', action='store_true',
                        help="also print audiocraft_lora.memory_plan's estimate of each AudioCraft case's peak memory "
                             "(what lora.activation_checkpointing=auto plans with), next to the measured peak")
    parser.add_argument('--count-only', action='store_true',
                        help='no timing: one step on fake tensors (CPU autocast) counting FLOPs, saved activations and '
                             'state, at any shape in seconds; state+saved GiB models the GPU peak memory')
    args = parser.parse_args(argv)
    if args.count_only:
        args.device = 'cpu'
        args.dtype = args.dtype or 'bfloat16'
    if args.dtype is None:
        args.dtype = 'bfloat16' if args.device == 'cuda' else 'float32'
    args.autocast_dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.dtype]
    if args.cases is None:
        args.cases = ','.join(c for c in CASES if args.device == 'cuda' or c not in CUDA_ONLY)
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    print(f"scale={args.scale} {SCALES[args.scale]} batch={args.batch} frames={args.frames} device={args.device} "
          f"dtype={args.dtype} rank={RANK} torch={torch.__version__}"
          + (f" gpu={torch.cuda.get_device_name()}" if args.device == 'cuda' else ''), flush=True)
    peak_name = 'est. GiB' if args.count_only else 'peak GiB'
    print(f"{'case':<14} {'step (s)':>9} {'frames/s':>10} {'GFLOP':>9} {peak_name:>9} {'saved MiB':>10} "
          f"{'state MiB':>10} {'trainable M':>12} {'launches':>9} {'resv GiB':>9}", flush=True)
    results: tp.Dict[str, dict] = {}
    for case in args.cases.split(','):
        try:
            r = (count if args.count_only else measure)(case, args)
        except Exception as exc:  # report and keep going (e.g. OOM of one case)
            print(f"{case:<14} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            gc.collect()
            if args.device == 'cuda':
                torch.cuda.empty_cache()
            continue
        results[case] = r
        peak = r['peak_GiB']
        peak = f"{peak:.2f}" if peak is not None else '-'
        timing = f"{r['step_s']:>9.4f} {r['frames_per_s']:>10.0f}" if r['step_s'] is not None else f"{'-':>9} {'-':>10}"
        est = f"  est. {r['est_GiB']:.2f} GiB" if r.get('est_GiB') else ''
        if (r.get('reserved_at_start_GiB') or 0) > 0.1:  # (left by an earlier case: not in this one's `resv GiB`)
            est += f"  ({r['reserved_at_start_GiB']:.2f} GiB reserved before it)"
        launched = r['launches'] if r['launches'] is not None else '-'
        reserved = f"{r['reserved_GiB']:.2f}" if r.get('reserved_GiB') is not None else '-'
        print(f"{case:<14} {timing} {r['gflop']:>9.1f} {peak:>9} "
              f"{r['saved_MiB']:>10.1f} {r['state_MiB']:>10.1f} {r['trainable_M']:>12.3f} {launched:>9} "
              f"{reserved:>9}{est}",
              flush=True)
    rat = ratios(results)
    print('ratios:\n' + '\n'.join(f'{k:<30} {v:.3f}' for k, v in rat.items()
                                  if ' step' in k or ' peak' in k or ' launches' in k or ' reserved' in k),
          flush=True)
    out = {'args': {k: v for k, v in vars(args).items() if k != 'autocast_dtype'}, 'results': results,
           'ratios': rat}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == '__main__':
    main()
