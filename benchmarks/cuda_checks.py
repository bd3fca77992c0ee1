"""CUDA checks run by hand on a GPU machine (the test suite is CPU-only): exactness and adapter-only updates.

`python benchmarks/cuda_checks.py` runs them all; `python benchmarks/cuda_checks.py loss,graphs` those named (the
names: `checks` in `main`)."""
import contextlib
import copy
import math
import sys
import typing as tp

import torch

from audiocraft.modules.conditioners import ConditioningAttributes
from audiocraft.modules.transformer import set_efficient_attention_backend
from audiocraft.solvers.musicgen import MusicGenSolver

from audiocraft_lora import base_models
from audiocraft_lora.lora import LoRASettings, inject_lora


def logits(lm, codes, autocast):
    attrs = [ConditioningAttributes(text={'description': 'trap beat'}) for _ in range(codes.shape[0])]
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        out = lm.compute_predictions(codes, [], lm.condition_provider(lm.condition_provider.tokenize(attrs)))
    return out


def main():
    import warnings
    warnings.filterwarnings('ignore')  # (Hydra's, AudioCraft's deprecations: gpu_quick.sh shows the last lines only)
    set_efficient_attention_backend('torch')
    pkg = base_models.load_lm_package(base_models.resolve_base('debug'))
    lm = base_models.build_lm(pkg).cuda().eval()
    codes = torch.randint(0, 256, (2, 4, 40), device='cuda')
    with torch.no_grad():
        base = torch.nan_to_num(logits(lm, codes, False).logits)
    inject_lora(lm, LoRASettings(rank=8, alpha=16))
    with torch.no_grad():
        after = torch.nan_to_num(logits(lm, codes, False).logits)
    # bit-equal on CPU (tests); on CUDA the merged `W + s B A` (= W here) is a new tensor, and cuBLAS may pick another
    # algorithm for it (alignment heuristics): a difference at float32 rounding level is expected, not a wrong result
    worst = float((base - after).abs().max() / base.abs().max())
    print(f'zero-init LoRA equals base on CUDA (fp32): bit-equal {torch.equal(base, after)}, worst relative '
          f'difference {worst:.1e}')
    before = copy.deepcopy(lm.state_dict())
    lm.train()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3, fused=True)
    for _ in range(3):
        out = logits(lm, codes, True)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
        ce.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])}
    print('bf16 autocast steps: changed tensors', len(changed), 'all LoRA:', all('.lora_' in k for k in changed),
          'loss finite:', bool(torch.isfinite(ce)))
    checks = {
        'fast_vs_plain': lambda: fast_vs_plain(pkg, codes),
        'loss': lambda: loss_on_cuda(lm, codes),
        'packed_qkv': lambda: packed_qkv_on_cuda(pkg, codes),
        'fused_norms': lambda: fused_norms_on_cuda(pkg, codes),
        'adapter_casts': lambda: adapter_casts_on_cuda(pkg, codes),
        'checkpointing': lambda: checkpointing_on_cuda(pkg, codes),
        'checkpointing_dropout': lambda: checkpointing_on_cuda(pkg, codes, dropout=0.1),
        'dropout_kernels': dropout_kernels_on_cuda,
        'checkpointing_dropout_kernels': lambda: checkpointing_on_cuda(pkg, codes, dropout=0.1, kernel=True),
        'dropout_replay': dropout_replay_on_cuda,
        'memory_estimate': lambda: memory_estimate_on_cuda(pkg),
        'graphs': lambda: graphs_on_cuda(pkg),
        'graphs_pinning': lambda: graphs_beside_a_pinning_thread(pkg),
        'solver_fits': solver_fits_one_batch,
        'solver_graphs': solver_graphs_vs_eager,
        'solver_fp16': solver_fp16,
    }
    only = sys.argv[1].split(',') if len(sys.argv) > 1 else list(checks)  # (`cuda_checks.py loss,graphs`: those)
    unknown = set(only) - set(checks)
    if unknown:
        raise SystemExit(f"unknown checks {sorted(unknown)}; known: {', '.join(checks)}")
    for name in only:
        checks[name]()


def loss_on_cuda(lm, codes):
    """The solver's cross-entropy (loss.py: no per-codebook slices or boolean gathers) against AudioCraft's on the
    same bf16-autocast logits of one forward (the LM trains with LoRA dropout: two forwards draw two masks), a third of
    the first clip masked as padding: the losses, the gradients w.r.t. the logits on the rows that count, NaN only
    where the delay pattern's logits are NaN, and the adapters' gradients (which may differ at bf16 rounding:
    attention's backward sums in another order).

    Two references. AudioCraft's loss under CUDA autocast, as its solver runs it: CUDA's autocast lists
    `log_softmax` and `nll_loss` as float32 ops but not `cross_entropy`, whose composite asks for the log-softmax in
    the input's dtype, so AudioCraft's log-probabilities are rounded to bf16 (1e-4 of the loss, session 20's H200:
    6.02932 vs 6.02997); CPU's autocast lists `cross_entropy` (the tests' bit-equality). And AudioCraft's loss on a
    float32 copy of the logits without autocast: what the solver's loss computes (a float32 log-softmax), which should
    match it up to the sums' order."""
    from audiocraft_lora.lora import lora_parameters
    from audiocraft_lora.loss import masked_cross_entropy
    params = [p for p in lora_parameters(lm).values() if p.requires_grad]
    out = logits(lm, codes, True)
    mask = out.mask.clone()
    mask[0, :, -codes.shape[-1] // 3:] = False

    def audiocraft(logits_, *args):
        return MusicGenSolver._compute_cross_entropy(None, logits_, *args)

    def audiocraft_float32(logits_, *args):
        with torch.autocast(codes.device.type, enabled=False):
            return MusicGenSolver._compute_cross_entropy(None, logits_.float(), *args)

    results = []
    for loss_fn in (masked_cross_entropy, audiocraft, audiocraft_float32):
        with torch.autocast(codes.device.type, dtype=torch.bfloat16):
            ce, _ = loss_fn(out.logits, codes, mask)
        grads = torch.autograd.grad(ce, [out.logits] + params, retain_graph=True)
        results.append((ce.detach(), grads[0], grads[1:]))
    (ours, dlogits, grads), *references = results
    nan_rows = dlogits.isnan().any(-1)
    nan_where_logits_are = bool((~nan_rows | ~out.mask).all())
    counted = mask.unsqueeze(-1).expand_as(dlogits)
    for name, (theirs, dref, ref) in zip(("AudioCraft's (bf16 autocast)", "AudioCraft's on float32 logits"),
                                         references):
        logits_worst = float((dlogits[counted] - dref[counted]).abs().max() / dref[counted].abs().max())
        worst = max(float((g - r).abs().max() / (r.abs().max() + 1e-12)) for g, r in zip(grads, ref))
        print(f"solver's cross-entropy vs {name} on {codes.device.type} (one forward): loss {float(ours):.7f} vs "
              f"{float(theirs):.7f}, logits' gradient on the counted rows worst relative difference "
              f"{logits_worst:.2e}, adapters' gradients worst relative difference {worst:.2e}")
    print(f"  NaN only at the pattern's NaN logits {nan_where_logits_are}, gradients finite "
          f"{all(bool(g.isfinite().all()) for g in grads)}")


def dropout_replay_on_cuda():
    """The fast path draws LoRA dropout's mask again in backward from the CUDA generator's state: the gradients must
    be those of the forward's mask, and the generator must be left where the forward left it."""
    from torch.nn import functional as F
    from audiocraft_lora.fast_lora import low_rank_linear
    gen = torch.Generator(device='cuda').manual_seed(1)
    x = torch.randn(64, 256, device='cuda', generator=gen, requires_grad=True)
    weight = torch.randn(128, 256, device='cuda', generator=gen)
    a = torch.randn(8, 256, device='cuda', generator=gen, requires_grad=True)
    b = torch.randn(128, 8, device='cuda', generator=gen, requires_grad=True)
    grad = torch.randn(64, 128, device='cuda', generator=gen)
    before = torch.cuda.get_rng_state()
    y = low_rank_linear(x, weight, None, a, b, 2.0, 0.5, replay=True)
    after_forward = torch.cuda.get_rng_state()
    y.backward(grad)
    left_alone = torch.equal(torch.cuda.get_rng_state(), after_forward)
    torch.cuda.set_rng_state(before)
    _, mask = torch.native_dropout(x.detach(), 0.5, True)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    (F.linear(x2, weight) + 2.0 * F.linear(F.linear(x2 * mask * 2.0, a2), b2)).backward(grad)
    worst = max(float((m - r).abs().max() / r.abs().max()) for m, r in ((x.grad, x2.grad), (a.grad, a2.grad),
                                                                          (b.grad, b2.grad)))
    print(f"dropout mask replayed on CUDA: generator left alone {left_alone}, worst relative grad difference "
          f"{worst:.2e} (a wrong mask gives ~1)")


def memory_estimate_on_cuda(pkg):
    """memory_plan's estimate (fake tensors, CUDA autocast) of a LoRA step vs torch.cuda.max_memory_allocated."""
    from audiocraft_lora.memory_estimate import StepShape, estimate_step
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    lm = base_models.build_lm(pkg)
    inject_lora(lm, LoRASettings(rank=8, alpha=16, dropout=0.05))
    apply_to_model(lm, SpeedSettings(activation_checkpointing='none'), True, torch.bfloat16)
    lm = lm.cuda().train()
    codes = torch.randint(0, 256, (8, 4, 1500), device='cuda')
    estimate = estimate_step(lm, None, StepShape(8, 1500), torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = logits(lm, codes, True)
    ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
    del out
    ce.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() / 2 ** 30
    optimizer = (estimate.resident - sum(t.numel() * t.element_size() for t in lm.state_dict().values())) / 2 ** 30
    print(f"memory estimate on CUDA (debug LM, batch 8 x 1500 frames, bf16): estimated {estimate.peak_gib:.3f} GiB, "
          f"measured {measured:.3f} GiB (ratio {estimate.peak_gib / measured:.3f}; optimizer state not allocated "
          f"here, {optimizer:.3f} GiB of the estimate)")


def checkpointing_on_cuda(pkg, codes, dropout: float = 0.0, kernel: bool = False):
    """Selective / mixed / whole-layer checkpointing vs none under bf16 autocast on CUDA (flash attention kernels are
    kept by the selective policy by name): same loss, same adapter gradients. With LoRA dropout by torch
    (`kernel=False`) also the masks drawn again in backward (`dropout_replay`), alone and under selective
    checkpointing: the same masks as kept ones; with `kernel` (lora.dropout_kernel) the seeds drawn again."""
    from audiocraft_lora import dropout_kernels
    from audiocraft_lora.lora import lora_parameters
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    settings = LoRASettings(rank=8, alpha=16, init='random', dropout=dropout)
    reference = base_models.build_lm(pkg)
    inject_lora(reference, settings)
    results = {}
    cases = [('none', {}), ('selective', {'activation_checkpointing': 'selective'}),
             ('mixed', {'activation_checkpointing': 'torch', 'checkpoint_fraction': 0.5,
                        'checkpoint_rest': 'selective'}),
             ('torch', {'activation_checkpointing': 'torch'})]
    if dropout and not kernel:
        cases += [('replay', {'dropout_replay': True}),
                  ('selective+replay', {'activation_checkpointing': 'selective', 'dropout_replay': True})]
    for name, kwargs in cases:
        lm = copy.deepcopy(reference)
        apply_to_model(lm, SpeedSettings(dropout_kernel='true' if kernel else 'false', **kwargs), True,
                       torch.bfloat16)
        lm = lm.cuda().train()
        dropout_kernels.check(lm, 'cuda', required=kernel)
        torch.manual_seed(0)  # the same dropout masks in every case
        out = logits(lm, codes, True)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
        ce.backward()
        results[name] = (float(ce.detach()), {k: p.grad.float() for k, p in lora_parameters(lm).items()})
    loss0, grads0 = results['none']
    for name, (loss, grads) in results.items():
        worst = max(float((grads[k] - g).abs().max() / (g.abs().max() + 1e-12)) for k, g in grads0.items())
        print(f"checkpointing {name} vs none (bf16 autocast, LoRA dropout {dropout}"
              f"{', dropout kernels' if kernel else ''}): loss {loss:.6f} vs {loss0:.6f}, "
              f"worst relative grad difference {worst:.2e}")


def _median_ms(fn, reset=lambda: None, runs: int = 20) -> float:
    """Median CUDA-event time of `fn()` (ms) over `runs` after 5 untimed, `reset()` between runs (untimed)."""
    spans = []
    for i in range(runs + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        reset()
        if i >= 5:
            spans.append(start.elapsed_time(end))
    return sorted(spans)[len(spans) // 2]


def dropout_kernels_on_cuda():
    """lora.dropout_kernel: the kernels' check on this GPU, the keep rate of a p=0.05 mask, and one musicgen-small
    feed-forward projection at batch 16 x 30 s (x [24016, 4096] -> 1024, rank 16) forward + backward: kernels
    (backward in two kernels, and in one: dropout_kernels.FUSED_BACKWARD) vs torch's dropout vs no dropout (ms, CUDA
    events, median of 20); then each kernel alone next to the same product without dropout (what the draws cost)."""
    from audiocraft_lora import dropout_kernels as dk
    from audiocraft_lora.fast_lora import low_rank_linear
    ok = dk.kernels_ok('cuda')
    dk.FUSED_BACKWARD = True
    fused_ok = dk.kernels_ok('cuda')  # (its own check: masked_backward_ too)
    dk.FUSED_BACKWARD = False
    seed = dk.draw_seed(torch.device('cuda'))
    rate = float(dk.keep_mask(seed, 24016, 4096, 0.05).float().mean())
    gen = torch.Generator('cuda').manual_seed(0)
    x = torch.randn(24016, 4096, device='cuda', generator=gen, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(1024, 4096, device='cuda', generator=gen, dtype=torch.bfloat16) * 0.02
    a = (torch.randn(16, 4096, device='cuda', generator=gen) * 0.02).requires_grad_()
    b = (torch.randn(1024, 16, device='cuda', generator=gen) * 0.02).requires_grad_()
    g = torch.randn(24016, 1024, device='cuda', generator=gen, dtype=torch.bfloat16)
    times, by_torch = {}, "torch's dropout"

    def clear():
        x.grad = a.grad = b.grad = None
    for name, p, kernel, fused in (('no dropout', 0.0, False, False), (by_torch, 0.05, False, False),
                                   ('kernels', 0.05, True, False), ('kernels, fused backward', 0.05, True, True)):
        if kernel and not (fused_ok if fused else ok):
            continue
        dk.FUSED_BACKWARD = fused

        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16):
                y = low_rank_linear(x, w, None, a, b, 2.0, p, kernel=kernel)
            torch.autograd.backward(y, g)
        times[name] = _median_ms(step, clear)
        dk.FUSED_BACKWARD = False
    print(f"LoRA dropout kernels on CUDA: check passed {ok} (fused backward {fused_ok}); keep rate at p=0.05 "
          f"{rate:.5f} (expected {1 - dk.threshold(0.05) / 65536:.5f}); linear2 of small b16 forward+backward "
          + ', '.join(f'{k} {v:.2f} ms' for k, v in times.items())
          + (f"; kernels / torch's {times['kernels'] / times[by_torch]:.2f}x" if 'kernels' in times else ''))
    if not ok:
        return
    xd, a16 = x.detach(), a.detach().bfloat16()
    gb = (g @ b.detach().bfloat16()).contiguous()
    dx = torch.zeros_like(xd)
    grad_mm = lambda: torch.mm(gb.t(), xd, out_dtype=torch.float32)  # (the fast path's dA without dropout)
    alone = {
        'rank_product': (lambda: dk.rank_product(xd, a16, seed, 2.0, 0.05), lambda: xd @ a16.t()),
        'masked_update_': (lambda: dk.masked_update_(dx, gb, a16, seed, 0.05), lambda: dx.addmm_(gb, a16)),
        'rank_grad': (lambda: dk.rank_grad(gb, xd, seed, 0.05), grad_mm),
    }
    if fused_ok:
        alone['masked_backward_'] = (lambda: dk.masked_backward_(dx, gb, a16, xd, seed, 0.05),
                                     lambda: (dx.addmm_(gb, a16), grad_mm()))
    if fused_ok:  # (bit for bit under the interpreter; here the products' tiles may round otherwise)
        dx1, dx2 = torch.zeros_like(xd), torch.zeros_like(xd)
        dk.masked_update_(dx1, gb, a16, seed, 0.05)
        same = (torch.equal(dk.masked_backward_(dx2, gb, a16, xd, seed, 0.05), dk.rank_grad(gb, xd, seed, 0.05))
                and torch.equal(dx1, dx2))
        print(f"  masked_backward_ bit-equal to masked_update_ + rank_grad on CUDA: {same}")
    copy_ms = _median_ms(lambda: xd.clone())
    print("  the kernels alone at linear2 of small b16 (ms; without dropout: the same product by torch; x.clone() "
          f"{copy_ms:.3f}, what one read + write of x takes): "
          + ', '.join(f'{k} {_median_ms(mine):.3f} vs {_median_ms(plain):.3f}' for k, (mine, plain) in alone.items()))


def adapter_casts_on_cuda(pkg, codes):
    """The adapters cast once per step (adapter_casts) and their gradients written in float32 by the GEMM
    (`torch.mm(..., out_dtype=torch.float32)`, CUDA only) vs casting at every use and after every GEMM: the same loss
    bit for bit (same casts), gradients within bf16 rounding (the float32-out GEMMs skip it), fewer launches."""
    from step_time import LaunchCounter
    from audiocraft_lora import fast_lora
    from audiocraft_lora.lora import lora_parameters
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    settings = LoRASettings(rank=8, alpha=16, init='random', dropout=0.0)
    reference = base_models.build_lm(pkg)
    inject_lora(reference, settings)
    results = {}
    for shared in (False, True):
        lm = copy.deepcopy(reference)
        apply_to_model(lm, SpeedSettings(), True, torch.bfloat16)
        if not shared:
            for module in lm.modules():
                module.__dict__.pop('_lora_cast_slots', None)
        lm = lm.cuda().train()
        fast_lora._FP32_OUT_GEMM.clear()
        if not shared:
            fast_lora._FP32_OUT_GEMM[(torch.device('cuda', torch.cuda.current_device()), torch.bfloat16)] = False
        counter = LaunchCounter()
        for step in range(2):  # (the second step is counted: shared copies made, the GEMM check done)
            for p in lm.parameters():
                p.grad = None
            with counter.mode if step else contextlib.nullcontext():
                out = logits(lm, codes, True)
                ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
                ce.backward()
        results[shared] = (float(ce.detach()), {k: p.grad.float() for k, p in lora_parameters(lm).items()},
                           counter.count, dict(fast_lora._FP32_OUT_GEMM), _fused_adamw_losses(lm, codes))
    (loss0, grads0, launches0, _, steps0), (loss1, grads1, launches1, gemm, steps1) = results[False], results[True]
    worst = max(float((grads1[k] - g).abs().max() / (g.abs().max() + 1e-12)) for k, g in grads0.items())
    print(f"adapter casts once per step + float32-out grad GEMMs {gemm} vs casts at every use (bf16 autocast): loss "
          f"{loss1:.6f} vs {loss0:.6f} (bit-equal {loss1 == loss0}), worst relative grad difference {worst:.2e}, "
          f"launches per forward+backward {launches1} vs {launches0}")
    # torch's fused AdamW (the solver's on CUDA) moves no version counter: the copies must follow its steps anyway
    print(f"fused AdamW steps, losses with shared casts {[round(x, 5) for x in steps1]} vs casts at every use "
          f"{[round(x, 5) for x in steps0]}: same within 1e-2 {all(abs(a - b) < 1e-2 for a, b in zip(steps0, steps1))}")


def _fused_adamw_losses(lm, codes, steps: int = 4):
    """The losses of `steps` fused AdamW steps (lr 1e-2) of `lm`, on a deep copy."""
    lm = copy.deepcopy(lm)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2, fused=True)
    losses = []
    for _ in range(steps):
        out = logits(lm, codes, True)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
        ce.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(ce.detach()))
    return losses


def fast_vs_plain(pkg, codes):
    """Fast path (bf16 frozen base) vs peft's plain path, same random adapter, CUDA: fp32 and bf16 autocast."""
    from audiocraft_lora.lora import lora_parameters
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    settings = LoRASettings(rank=8, alpha=16, init='random', dropout=0.0)
    for autocast in (False, True):
        losses, grads = [], []
        for fast in (False, True):
            lm = base_models.build_lm(pkg)
            inject_lora(lm, settings, fast_path=fast)
            if fast and autocast:
                apply_to_model(lm, SpeedSettings(base_dtype='bfloat16'), True, torch.bfloat16)
            lm = lm.cuda().train()
            out = logits(lm, codes, autocast)
            ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
            ce.backward()
            losses.append(float(ce.detach()))
            grads.append({k: p.grad.float() for k, p in lora_parameters(lm).items()})
        worst = max(float((grads[1][k] - g).abs().max() / (g.abs().max() + 1e-12)) for k, g in grads[0].items())
        print(f"fast vs plain ({'bf16 autocast' if autocast else 'fp32'}): loss {losses[1]:.6f} vs {losses[0]:.6f}, "
              f"worst relative grad difference {worst:.2e}")


def packed_qkv_on_cuda(pkg, codes):
    """Whether the attention's backward on CUDA hands packed_qkv's split its q/k/v gradients packed in one buffer
    (then returned as a view: no copy) or separately (copied into one), in float32 and under bf16 autocast."""
    from audiocraft_lora import packed_qkv
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    original, seen = packed_qkv._packed_view, []

    def counting(*args, **kwargs):
        view = original(*args, **kwargs)
        seen.append(view is not None)
        return view
    packed_qkv._packed_view = counting
    try:
        for autocast in (False, True):
            seen.clear()
            lm = base_models.build_lm(pkg)
            inject_lora(lm, LoRASettings(rank=8, alpha=16, init='random', dropout=0.0))
            apply_to_model(lm, SpeedSettings(), autocast, torch.bfloat16)
            lm = lm.cuda().train()
            out = logits(lm, codes, autocast)
            MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)[0].backward()
            print(f"packed_qkv on CUDA ({'bf16 autocast' if autocast else 'fp32'}): {sum(seen)} of {len(seen)} "
                  "splits got their gradients packed (a view, no copy)")
    finally:
        packed_qkv._packed_view = original


def fit_one_batch(overrides: tp.Sequence[str], steps: int = 20,
                  prepare: tp.Optional[tp.Callable[[tp.Any], tp.Any]] = None) -> tp.List[float]:
    """The cross-entropies of `steps` solver steps (lr 1e-2, constant) on one fixed batch of the lora_debug recipe,
    the solver built as `dora run solver=musicgen/lora_debug <overrides>` builds it. A solver that trains fits it
    (tests/test_solver.py: 6.01 -> 5.34 on CPU); one that trains nothing stays where it started. `prepare(solver)`
    runs before the first step."""
    from audiocraft_lora import train
    argv = ['solver=musicgen/lora_debug', 'dataset.num_workers=0', 'optim.lr=1e-2', 'schedule.lr_scheduler=null',
            'optim.epochs=1', f'optim.updates_per_epoch={steps}', *overrides]
    xp = train.main.get_xp(argv)
    xp.folder.mkdir(parents=True, exist_ok=True)
    with xp.enter():
        solver = train.get_solver(xp.cfg)
    solver.model.cfg_dropout.p = 0.0  # (CFG dropout may drop every condition of a tiny batch)
    if prepare is not None:
        prepare(solver)
    batch = next(iter(solver.dataloaders['train']))
    solver.model.train()
    solver._current_stage = 'train'  # as flashy's run_stage does, so solver.is_training holds
    try:
        return [float(solver.run_step(idx, batch, {})['ce']) for idx in range(steps)]
    finally:
        solver._current_stage = None


def fused_norms_on_cuda(pkg, codes):
    """lora.fused_norms on CUDA: the Triton kernels pass their check, and bf16 training steps with them give the
    losses and adapter gradients of AudioCraft's norms up to float32 summation order (bit for bit on CPU)."""
    from audiocraft_lora import fused_norms, norm_kernels
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    device = torch.device('cuda', torch.cuda.current_device())
    usable = {width: norm_kernels.triton_ok(device, width) for width in (32, 1024, 1536, 2048)}
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        lm = base_models.build_lm(pkg)
        inject_lora(lm, LoRASettings(rank=8, alpha=16, init='random'))
        info = apply_to_model(lm, SpeedSettings(fused_norms=fused), autocast=True, autocast_dtype=torch.bfloat16)
        lm = lm.cuda().train()
        checked = fused_norms.check_kernels(lm)
        params = [p for p in lm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        losses, grads = [], []
        for _ in range(3):
            out = logits(lm, codes, True)
            ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
            ce.backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
            opt.step()
            opt.zero_grad()
            losses.append(float(ce))
        runs.append((losses, grads, info.get('fused_norms')))
    (ref_losses, ref_grads, _), (losses, grads, count) = runs
    worst = max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(grads, ref_grads))
    print(f"fused norms on CUDA (Triton kernels usable by width: {usable}; the LM's {checked}; {count} norms): losses "
          f"{[round(x, 6) for x in losses]} vs AudioCraft's norms {[round(x, 6) for x in ref_losses]}, worst loss "
          f"difference {max(abs(a - b) for a, b in zip(losses, ref_losses)):.2e}, worst relative grad difference "
          f"{worst:.2e}")


def _graph_steps(lm, codes, lengths, opt):
    """Losses, adapter gradients and the CUDA generator's offset (what dropout drew) after a training step per text
    length (bf16 autocast, fused AdamW step after each), with an eval forward in between."""
    losses, grads, offsets = [], [], []
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    for length in lengths:
        lm.train()
        generator = torch.Generator(device='cuda').manual_seed(length)
        text = torch.randn(codes.shape[0], length, lm.dim, device='cuda', generator=generator)
        condition = {'description': (text, torch.ones(codes.shape[0], length, device='cuda'))}
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = lm.compute_predictions(codes, [], condition)
            ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
        ce.backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.requires_grad]).clone())
        opt.step()
        opt.zero_grad()
        losses.append(float(ce))
        offsets.append(generator.get_offset() if hasattr(generator, 'get_offset') else None)
        lm.eval()
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            lm.compute_predictions(codes, [], condition)
    return losses, grads, offsets


def graphs_on_cuda(pkg):
    """lora.graph_layers: the layers replayed as CUDA graphs give eager's losses and gradients (text lengths
    changing between steps, beyond graph_shapes too, eval calls in between, adapters updated by fused AdamW), and
    with LoRA dropout draw a new mask at every replay."""
    from audiocraft_lora import dropout_kernels, fused_norms, layer_graphs
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    codes = torch.randint(0, 256, (4, 4, 200), device='cuda', generator=torch.Generator('cuda').manual_seed(0))
    for dropout, bucket, plan in ((0.0, 1, 'none'), (0.1, 1, 'none'), (0.0, 32, 'none'), (0.1, 1, 'torch'),
                                  (0.0, 1, 'selective'), (0.0, 32, 'selective'), (0.1, 1, 'selective')):
        # (selective at dropout 0: the FF tail outside each checkpoint, the stack chained; padded: masked in recompute)
        # (padded: 32, 64, 192, 32, 64, 32; 192 beyond graph_shapes=2, recomputed; cuDNN's masked backward had NaN
        # gradients at key lengths 64 mod 128, pytorch#196678)
        lengths = [3, 9, 3, 12, 9, 3] if bucket == 1 else [3, 40, 170, 9, 40, 3]
        runs = []
        for graphed in (False, True):
            torch.manual_seed(0)
            lm = base_models.build_lm(pkg)
            inject_lora(lm, LoRASettings(rank=8, alpha=16, dropout=dropout, init='random'))
            lm = lm.cuda()
            apply_to_model(lm, SpeedSettings(activation_checkpointing=plan), autocast=True,
                           autocast_dtype=torch.bfloat16)  # (recomputed inside the graphs, or eagerly alike)
            fused_norms.check_kernels(lm)  # (as the solver does, before any capture)
            dropout_kernels.check(lm, 'cuda')
            graphs = layer_graphs.install(lm, max_shapes=2, text_bucket=bucket) if graphed else None
            opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3, fused=True)
            torch.cuda.synchronize()
            runs.append(_graph_steps(lm, codes, lengths, opt))
        (eager_losses, eager_grads, eager_offsets), (losses, grads, offsets) = runs
        worst = max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(grads, eager_grads))
        if bucket > 1:  # (a masked attention kernel on the padded text: equal up to bf16 rounding, not bit for bit)
            print(f"CUDA graphs ({plan}), text padded to multiples of {bucket} (lora.graph_text_bucket), vs eager at "
                  f"exact lengths: losses {[round(x, 5) for x in losses]} vs {[round(x, 5) for x in eager_losses]}, "
                  f"worst loss difference {max(abs(a - b) for a, b in zip(losses, eager_losses)):.2e}, worst relative "
                  f"grad difference {worst:.2e}, gradients finite {all(bool(g.isfinite().all()) for g in grads)}; "
                  f"{graphs.summary()}")
        elif plan != 'none':  # (the masks kept, not drawn again in the backward graph)
            print(f"CUDA graphs with {plan} checkpointing inside, LoRA dropout {dropout}, vs eager {plan}: losses "
                  f"{[round(x, 4) for x in losses]} vs {[round(x, 4) for x in eager_losses]}, bit-equal "
                  f"{losses == eager_losses}, worst relative grad difference {worst:.2e}; generator offsets equal: "
                  f"{offsets == eager_offsets}; {graphs.summary()}")
        elif dropout == 0.0:
            print(f"CUDA graphs of the layers vs eager (bf16, text lengths {lengths}, graph_shapes=2): losses "
                  f"{[round(x, 5) for x in losses]} vs {[round(x, 5) for x in eager_losses]}, bit-equal "
                  f"{losses == eager_losses}, worst relative grad difference {worst:.2e}; {graphs.summary()}")
        else:  # (captures draw from a forked generator: replays draw eager's masks)
            print(f"CUDA graphs with LoRA dropout 0.1: losses {[round(x, 4) for x in losses]} vs eager "
                  f"{[round(x, 4) for x in eager_losses]}, bit-equal {losses == eager_losses}, worst relative grad "
                  f"difference {worst:.2e}; generator offsets after each step equal: {offsets == eager_offsets} "
                  f"({offsets})")
    # the same input twice, no optimizer step: a new dropout mask at each replay gives another loss (the last lm:
    # LoRA dropout 0.1, selective inside the graphs)
    lm.train()
    text = torch.randn(codes.shape[0], 3, lm.dim, device='cuda')
    twice = []
    for _ in range(2):
        lm.zero_grad(set_to_none=True)  # (param.grad is the graphs' static buffer: never accumulate into it)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = lm.compute_predictions(codes, [], {'description': (text, torch.ones(4, 3, device='cuda'))})
            ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)
        ce.backward()
        twice.append(float(ce))
    print(f"CUDA graphs, dropout 0.1, selective, one input replayed twice: losses {twice} (new mask each replay: "
          f"{twice[0] != twice[1]})")


def graphs_beside_a_pinning_thread(pkg):
    """Captures while another thread allocates page-locked memory (the DataLoader's pin-memory thread with
    lora.pin_memory): in CUDA's global capture mode that thread's allocation breaks the capture; ours capture in
    thread-local mode."""
    import threading
    from audiocraft_lora import layer_graphs
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    stop, errors = threading.Event(), []

    def pin():
        try:
            while not stop.is_set():
                torch.empty(64 << 20, dtype=torch.uint8).pin_memory()  # (a capture empties the host cache)
        except Exception as error:  # noqa
            errors.append(f"{type(error).__name__}: {error}")
    lm = base_models.build_lm(pkg)
    inject_lora(lm, LoRASettings(rank=8, alpha=16, dropout=0.05))
    lm = lm.cuda()
    apply_to_model(lm, SpeedSettings(), autocast=True, autocast_dtype=torch.bfloat16)
    graphs = layer_graphs.install(lm, strict=True)
    codes = torch.randint(0, 256, (4, 4, 200), device='cuda')
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3, fused=True)
    thread = threading.Thread(target=pin, daemon=True)
    thread.start()
    try:
        losses, _, _ = _graph_steps(lm, codes, [3, 5, 7, 3], opt)
        outcome = f"captured {graphs.stats['captures']} signatures, losses finite {all(map(math.isfinite, losses))}"
    except Exception as error:  # noqa
        outcome = f"capture failed: {type(error).__name__}: {str(error)[:200]}"
    finally:
        stop.set()
        thread.join()
    print(f"CUDA graphs captured beside a thread pinning memory: {outcome}; pinning thread errors: {errors[:1]}")


def solver_fits_one_batch():
    """`fit_one_batch` on CUDA, bf16 autocast, every speed setting at its default (fused AdamW, shared adapter casts,
    memory plan, merged weights kept where they fit)."""
    ces = fit_one_batch(['device=cuda', 'autocast=true', 'autocast_dtype=bfloat16'])
    print(f"solver on cuda, default speed settings, {len(ces)} steps on one batch: CE {ces[0]:.4f} -> {ces[-1]:.4f} "
          f"(learns: {ces[-1] < 0.92 * ces[0]})")


def solver_graphs_vs_eager():
    """The solver's steps on CUDA (bf16, LoRA dropout 0.1, the defaults: the layers' CUDA graphs) against the same
    with lora.graph_layers=false, seeded alike: the captures draw from a forked generator, so the dropout masks and
    the cross-entropies should be the same."""
    import random
    import numpy as np
    runs = []
    for graphs, bucket in (('false', 1), ('auto', 1), ('auto', 32)):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        runs.append(fit_one_batch(['device=cuda', 'autocast=true', 'autocast_dtype=bfloat16', 'lora.dropout=0.1',
                                   f'lora.graph_layers={graphs}', f'lora.graph_text_bucket={bucket}'], steps=6))
    print(f"solver on cuda, LoRA dropout 0.1, graphs vs eager: CE {[round(x, 5) for x in runs[1]]} vs "
          f"{[round(x, 5) for x in runs[0]]}, bit-equal {runs[0] == runs[1]}")
    print(f"solver on cuda, LoRA dropout 0.1, graphs with the text padded (lora.graph_text_bucket=32, the default) "
          f"vs eager: CE {[round(x, 5) for x in runs[2]]}, worst difference "
          f"{max(abs(a - b) for a, b in zip(runs[2], runs[0])):.2e}")


def solver_fp16():
    """The solver on CUDA under float16 autocast (GPUs without bf16: a T4, a V100; AudioCraft's GradScaler), LoRA
    dropout 0.1, with the layers' CUDA graphs and without, seeded alike: the same cross-entropies, and it learns."""
    import random
    import numpy as np
    runs = []
    for graphs in ('false', 'auto'):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        runs.append(fit_one_batch(['device=cuda', 'autocast=true', 'autocast_dtype=float16', 'lora.dropout=0.1',
                                   f'lora.graph_layers={graphs}', 'lora.graph_text_bucket=1'], steps=12))
    print(f"solver on cuda, float16 autocast, LoRA dropout 0.1: CE {runs[1][0]:.4f} -> {runs[1][-1]:.4f} (learns: "
          f"{runs[1][-1] < 0.95 * runs[1][0]}), graphs vs eager bit-equal {runs[0] == runs[1]} (worst difference "
          f"{max(abs(a - b) for a, b in zip(*runs)):.2e})")


if __name__ == '__main__':
    main()
