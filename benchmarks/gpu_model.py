"""A GPU time model of one training step, computed on any machine: the step of `step_time.py` run on fake tensors
(shapes only: no GPU, no data) under CUDA's autocast rules, each kernel costed by a roofline.

For a session without a GPU, to rank speed levers at the real shapes (musicgen-small batch 16 x 30 s, medium) before
a GPU hour is spent on them. Every ATen op that runs a kernel (`step_time.LaunchCounter`'s rule) costs

    max(FLOPs / peak_flops, bytes read and written / bandwidth, min_kernel_s)

FLOPs from torch's flop counter (matmuls, attention), bytes from the op's tensor arguments and results (as viewed,
not their storage). Ops are grouped (gemm, attention, cast/copy, norm, elementwise, reduce, index, optimizer) so
the table can be held against `profile_step.py` on a real GPU. The host is modelled as a fixed time per launch
(`host ms`); a step takes the larger of the two (at small batches the host: CUDA graphs are what removes it).
What the model cannot see: kernel quality (AudioCraft's sort-based `index_put_` gets a measured factor, `SLOW`),
overlap, Python costs that differ per op, and fusion (compiled cases are not modelled). Defaults are an H100 SXM's
sustained rates, calibrated against the session-6 measurements in benchmarks/README.md (within ~15%).

Autocast is CPU autocast with CUDA's float32 rules (`CudaAutocastRules`), and the fast path's adapter gradients
are written by float32-out GEMMs as on CUDA; clip_grad_norm_ is the foreach one, as on CUDA. The fast path's adapter
casts are shared as on a real device (adapter_casts: one foreach copy per optimizer step, which the memory estimate's
fake tensors otherwise skip), and a foreach op or fused AdamW counts the launches CUDA's multi_tensor_apply makes.

    python benchmarks/gpu_model.py --scale small --batch 16 --frames 1500 --cases full,lora_fast,hf_lora
"""
import argparse
import collections
import importlib
import sys
import typing as tp
from pathlib import Path
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402
from audiocraft_lora import adapter_casts, fast_lora  # noqa: E402
xformers_unbind = importlib.import_module('xformers.ops.unbind')  # (the module: xformers.ops.unbind is its function)

GEMM = {'mm', 'addmm', 'bmm', 'baddbmm', '_scaled_mm', 'linear'}
CAST = {'_to_copy', 'copy_', 'clone', 'cat', 'stack', 'contiguous', 'to', '_copy_from_and_resize'}
NORM = {'native_layer_norm', 'native_layer_norm_backward', 'layer_norm', '_fused_rms_norm',
        '_fused_rms_norm_backward', 'layer_norm_to', 'layer_norm_to_backward', 'add_layer_norm_to',
        'add_layer_norm_to_backward'}  # (the last four: lora.fused_norms)
INDEX = {'index_put_', 'index_put', '_index_put_impl_', 'index_add_', 'index_add', 'index_select', 'gather',
         'scatter', 'scatter_', 'scatter_add_', 'embedding', 'embedding_dense_backward', 'index', 'masked_fill_',
         'masked_scatter_', 'nonzero', 'sort'}
REDUCE = {'sum', 'mean', 'norm', 'linalg_vector_norm', '_foreach_norm', 'amax', 'max', 'min', 'all', 'any',
          '_log_softmax', '_log_softmax_backward_data', 'nll_loss_forward', 'nll_loss_backward', 'nll_loss2d_forward',
          'nll_loss2d_backward', 'logsumexp', '_softmax', '_softmax_backward_data'}


NO_KERNEL = {'device', 'dim', 'size', 'stride', 'sym_size', 'sym_stride', 'sym_numel', 'sym_storage_offset',
             'is_same_size', 'layout'}  # metadata queries (seen as ops on fake tensors)
# Kernels slower than their bytes say, by a factor measured on an H100 (session-6 profile, small batch 16): the
# sort-based backward of AudioCraft's logits revert (`index_put_` with accumulate: 40 ms where its bytes take 0.5)
SLOW = {'index_put': 80.0, '_index_put_impl_': 80.0}
# CUDA's multi_tensor_apply (foreach ops, fused AdamW): one launch takes at most this many tensors per list depth
# (1-5 lists), and 320 blocks of 65,536 elements; more needs more launches (one per dispatch on CPU)
FOREACH_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
FOREACH_MAX_BLOCKS, FOREACH_CHUNK = 320, 65536


# Ops the dispatcher sees once that run more than one kernel on CUDA (a zero fill, then the op's own kernel; the
# partial sums of dropout_kernels' dA, then their sum)
COMPOSITE_LAUNCHES = {'slice_backward': 2, 'select_backward': 2, 'nll_loss_backward': 2, 'dropout_rank_grad': 2}
# Ops that draw dropout decisions: {op: the argument of the drawn tensor's size (-1: the output)}. Each decision costs
# integer work: LoRA dropout inside the rank-r products (audiocraft_lora/dropout_kernels.py) draws 8 per Philox4x32-10
# call, ~20 instructions an element with the unpacking, the select and the bf16 packing (the SASS of an offline sm_90
# compile: 19-30); torch's dropout draws 4 per call (curand's uniform4), charged alike. At the H100's ~16.7 T integer
# instructions/s (64 per clock per SM), overlapped with the memory traffic (the max of the two); the in-place update of
# dx also writes it (its bytes counted twice).
DROPOUT_KERNELS = {'dropout_rank_product': 0, 'dropout_rank_product_beside': 0, 'dropout_masked_update': 0,
                   'dropout_rank_grad': 1, 'dropout_masked_backward': 0, 'dropout_keep': -1, 'native_dropout': 0}
RNG_SECONDS_PER_ELEMENT = 20 / 16.7e12


def kernel_launches(name: str, args: tp.Sequence[tp.Any]) -> int:
    """Kernel launches of a foreach / fused-optimizer op on CUDA's fast route, or of the composite ops above (1 for
    any other op)."""
    if not (name.startswith('_foreach') or name.startswith('_fused_adam')):
        return COMPOSITE_LAUNCHES.get(name, 1)
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    if name.startswith('_fused_adam'):
        lists = lists[:4]  # params, grads, exp_avgs, exp_avg_sqs (the step counters ride along)
    depth = min(len(lists), 5)
    chunks = sum(-(-t.numel() // FOREACH_CHUNK) for t in lists[0])
    launches = max(-(-len(lists[0]) // FOREACH_MAX_TENSORS[depth]), -(-chunks // FOREACH_MAX_BLOCKS), 1)
    return launches + (1 if name == '_foreach_norm' else 0)  # (its per-tensor totals are reduced once more)


def category(name: str) -> str:
    if name in GEMM:
        return 'gemm'
    if 'attention' in name:
        return 'attention'
    if name.startswith('_foreach') or name.startswith('_fused_adam'):
        return 'optimizer'
    if name in CAST:
        return 'cast/copy'
    if name in NORM:
        return 'norm'
    if name in INDEX:
        return 'index'
    if name in REDUCE:
        return 'reduce'
    return 'elementwise'


def _nbytes(tensors: tp.Iterable[tp.Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class KernelCosts(TorchDispatchMode):
    """Costs every kernel-running op seen while active: FLOPs, bytes moved, modelled seconds, by category."""

    def __init__(self, peak_flops: float, attention_flops: float, bandwidth: float, min_kernel_s: float,
                 detail: bool = False):
        super().__init__()
        self.detail = detail
        self.peak_flops, self.attention_flops = peak_flops, attention_flops
        self.bandwidth, self.min_kernel_s = bandwidth, min_kernel_s
        self.reset()

    def reset(self):
        self.seconds: tp.Dict[str, float] = collections.Counter()
        self.launches: tp.Dict[str, int] = collections.Counter()
        self.by_op: tp.Dict[str, float] = collections.Counter()
        self.by_call: tp.Dict[str, float] = collections.Counter()
        self.flops_by_kind: tp.Dict[str, int] = collections.Counter()
        self.flops = self.bytes = 0

    def cost(self, name: str, flops: int, moved: int, accumulate: bool = False) -> float:
        rate = self.attention_flops if category(name) == 'attention' else self.peak_flops
        slow = SLOW.get(name, 1.0) if accumulate else 1.0
        return max(flops / rate, slow * moved / self.bandwidth, self.min_kernel_s)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in step_time.LaunchCounter.METADATA or name in NO_KERNEL:
            return out
        if name.startswith('_scaled_dot_product_flash_attention_for_cpu'):
            flops = _attention_flops(name, args, kwargs)
        else:
            flop_fn = flop_registry.get(func.overloadpacket)
            flops = flop_fn(*args, **kwargs, out_val=out) if flop_fn is not None else 0
        moved = _nbytes(tree_leaves((args, kwargs))) + _nbytes(tree_leaves(out))
        kind = category(name)
        accumulate = bool(kwargs.get('accumulate', args[3] if len(args) > 3 and name in SLOW else False))
        if name in ('dropout_masked_update', 'dropout_masked_backward'):
            moved += _nbytes([args[0]])
        seconds = self.cost(name, flops, moved, accumulate)
        if name in DROPOUT_KERNELS:
            drawn = out if DROPOUT_KERNELS[name] < 0 else args[DROPOUT_KERNELS[name]]
            seconds = max(seconds, drawn.numel() * RNG_SECONDS_PER_ELEMENT)
        self.seconds[kind] += seconds
        self.by_op[name] += seconds
        if self.detail:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            shapes = (' '.join(f"{str(t.dtype)[6:]}{list(t.shape)}" for t in tensors) if len(tensors) <= 6
                      else f'{len(tensors)} tensors')
            self.by_call[f'{name} {shapes}'] += seconds
        self.launches[kind] += kernel_launches(name, args)
        self.flops += flops
        self.flops_by_kind[kind] += flops
        self.bytes += moved
        return out

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


# Ops CUDA's autocast runs in float32 where CPU's runs them in bf16 (its `fp32` and `fp32_set_opt_dtype` lists, as
# far as a MusicGen step meets them; checked op by op on fake CUDA tensors): what the emulation below recasts
CUDA_FP32_OPS = {'layer_norm', 'group_norm', 'softmax', 'log_softmax', 'sum', 'pow', 'exp', 'rsqrt', 'cumsum',
                 'cumprod', 'prod', 'norm', 'vector_norm', 'logsumexp', 'log', 'log1p', 'expm1', 'reciprocal'}


class CudaAutocastRules(TorchFunctionMode):
    """CPU autocast with CUDA's float32 rules: an op in `CUDA_FP32_OPS` given a bf16/fp16 tensor while CPU autocast
    is on runs on float32 casts of its inputs, as it would under `torch.autocast('cuda')`. (Fake CUDA tensors would
    give the real rules, but autograd's engine needs a GPU to run their backward.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (getattr(func, '__name__', None) in CUDA_FP32_OPS and torch.is_autocast_enabled('cpu')
                and kwargs.get('dtype') is None):
            low = [t for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)]
            if low:
                def up(t):
                    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16,
                                                                                     torch.float16) else t
                args, kwargs = tree_map(up, (args, kwargs))
                with torch.autocast('cpu', enabled=False):
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


def _fp32_out_gemm_as_on_cuda(t: torch.Tensor) -> bool:
    """The fast path's adapter gradients as on CUDA: one GEMM writing float32, no cast after it."""
    return t.dtype in (torch.bfloat16, torch.float16)


class _NeverFake:
    """Stands for FakeTensor in fast_lora's isinstance checks: its shared adapter casts (adapter_casts), which the
    memory estimate's fake tensors skip, are taken as a real step takes them (its dropout replay still sees the
    active fake mode)."""


def _attention_flops(func_name: str, args, kwargs) -> int:
    """FLOPs of the CPU flash-attention ops that stand in for CUDA's (a causal mask halves the work)."""
    if func_name == '_scaled_dot_product_flash_attention_for_cpu':
        q, k, v = args[:3]
        causal = kwargs.get('is_causal', args[4] if len(args) > 4 else False)
        return sdpa_flop_count(q.shape, k.shape, v.shape) // (2 if causal else 1)
    grad, q, k, v = args[:4]
    causal = kwargs.get('is_causal', args[7] if len(args) > 7 else False)
    return sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape) // (2 if causal else 1)


def model_case(case: str, args) -> dict:
    """One step (forward, backward, AdamW) of `case` on fake CUDA tensors, every kernel costed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if case in ('lora_compile', 'lora_compile_ro') or case.startswith('encode'):
        raise RuntimeError(f'{case} is not modelled (compiled kernels fuse ops; encode is not an LM step)')
    costs = KernelCosts(args.peak_tflops * 1e12, args.attention_tflops * 1e12, args.bandwidth_gbs * 1e9,
                        args.min_kernel_us * 1e-6, detail=args.detail > 0)
    with FakeTensorMode(allow_non_fake_inputs=True), step_time._cpu_moves_are_noops(), \
            step_time.patterns_on_real_tensors(), CudaAutocastRules(), \
            mock.patch.object(fast_lora, '_fp32_out_gemm', _fp32_out_gemm_as_on_cuda), \
            mock.patch.object(fast_lora, 'FakeTensor', _NeverFake), \
            mock.patch.object(adapter_casts, '_storage', id), \
            mock.patch.object(xformers_unbind, '_get_storage_base', id), \
            step_time.kernels_as_on_gpu():  # (fake tensors have no data pointer: xformers' unbind would take
        # three separate gradients for views of one storage and skip its stack, which a GPU step runs)
        model, loss_fn = step_time.make_case(case, args)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        fused = case.startswith('lora_fast') or case in ('lora_sac', 'lora_mixed', 'lora_ckpt', 'lora_ckpt_half')
        optimizer = step_time._optimizer(params, **({'fused': True} if fused else {'foreach': True}))
        for _ in range(2):  # the first step builds what is kept (adapter casts, optimizer state): cost the second
            costs.reset()
            with costs:
                loss = loss_fn()
                loss.backward()
                if params:
                    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # (CUDA's default; not the CPU's)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del loss
    def top_ms(costed: tp.Dict[str, float], n: int) -> tp.Dict[str, float]:
        return {k: v * 1e3 for k, v in sorted(costed.items(), key=lambda kv: -kv[1])[:n]}
    return {'case': case, 'model_s': costs.total_s, 'tflop': costs.flops / 1e12, 'gbytes': costs.bytes / 1e9,
            'launches': sum(costs.launches.values()), 'by_kind_ms': {k: v * 1e3 for k, v in costs.seconds.items()},
            'launches_by_kind': dict(costs.launches),
            'gflop_by_kind': {k: v / 1e9 for k, v in costs.flops_by_kind.items()},
            'top_calls_ms': top_ms(costs.by_call, args.detail), 'top_ops_ms': top_ms(costs.by_op, args.top)}


KINDS = ('gemm', 'attention', 'cast/copy', 'norm', 'elementwise', 'reduce', 'index', 'optimizer')


def main(argv: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scale', default='small', choices=sorted(step_time.SCALES))
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--frames', type=int, default=1500)
    parser.add_argument('--card', type=int, default=2048)
    parser.add_argument('--cases', default='full,lora_fast,lora_fast_f32attn,hf_lora')
    parser.add_argument('--lora-dropout', type=float, default=0.0)
    parser.add_argument('--concat-rank-gemms', default=','.join(fast_lora.CONCAT_PARTS),
                        help="the lora_fast_concat case's fast_lora.CONCAT_RANK_GEMMS parts")
    parser.add_argument('--peak-tflops', type=float, default=750.0, help='sustained bf16 GEMM rate')
    parser.add_argument('--attention-tflops', type=float, default=350.0, help='sustained flash-attention rate')
    parser.add_argument('--bandwidth-gbs', type=float, default=2600.0, help='sustained memory bandwidth')
    parser.add_argument('--min-kernel-us', type=float, default=3.0, help='the least a kernel takes on the GPU')
    parser.add_argument('--detail', type=int, default=0, help='list the N op calls (name, input dtypes and shapes) '
                        'costing most, per case')
    parser.add_argument('--host-us', type=float, default=45.0,
                        help='host time per launch (Python, dispatcher, launch): 40-50 us in every host-bound step '
                             'measured on the H100 (session 6)')
    parser.add_argument('--top', type=int, default=12, help='list the ops costing most, per case')
    args = parser.parse_args(argv)
    args.device, args.dtype, args.autocast_dtype, args.count_only = 'cpu', 'bfloat16', torch.bfloat16, True
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    print(f"GPU time model: scale={args.scale} {step_time.SCALES[args.scale]} batch={args.batch} "
          f"frames={args.frames} bf16 rank={step_time.RANK} GEMM {args.peak_tflops:.0f} TFLOP/s attention "
          f"{args.attention_tflops:.0f} TFLOP/s "
          f"bandwidth={args.bandwidth_gbs:.0f} GB/s min kernel={args.min_kernel_us} us")
    print(f"{'case':<18} {'GPU ms':>7} {'host ms':>7} " + ' '.join(f'{k:>11}' for k in KINDS)
          + f" {'TFLOP':>7} {'GB':>7} {'launches':>9}")
    results = {}
    for case in args.cases.split(','):
        r = model_case(case, args)
        r['host_s'] = r['launches'] * args.host_us * 1e-6
        r['step_s'] = max(r['model_s'], r['host_s'])
        results[case] = r
        print(f"{case:<18} {r['model_s'] * 1e3:>7.1f} {r['host_s'] * 1e3:>7.1f} "
              + ' '.join(f"{r['by_kind_ms'].get(k, 0.0):>11.1f}" for k in KINDS)
              + f" {r['tflop']:>7.2f} {r['gbytes']:>7.1f} {r['launches']:>9}", flush=True)
    for case, r in results.items():
        if args.top:
            print(f"{case} top ops (ms): " + ', '.join(f'{k} {v:.1f}' for k, v in r['top_ops_ms'].items()))
        for call, ms in r['top_calls_ms'].items():
            print(f"  {ms:8.2f} ms  {call}")
    for ref in ('full', 'hf_lora'):
        for case, r in results.items():
            if ref in results and case != ref and not case.startswith('hf_full'):
                print(f"{case}/{ref}: GPU time {r['model_s'] / results[ref]['model_s']:.3f}, step (the larger of GPU "
                      f"and host) {r['step_s'] / results[ref]['step_s']:.3f}")
    return results


if __name__ == '__main__':
    main()
