"""The memory plan of a training run: which activation checkpointing (and dropout-mask replay) fits the GPU.

    lora.activation_checkpointing: auto   # the first plan of plans.PLANS whose estimated peak fits the budget
    lora.memory_budget_gib: auto          # auto: what the GPU has for this process | a number of GiB | none

`plan_training` runs before the first step (the solver's `build_model`): it estimates the step's peak memory for
each plan in turn (`memory_estimate.estimate_step`, on fake tensors) and keeps the first that fits, or stops with
the batch that would fit.

How close the estimate is (benchmarks/step_time.py --count-only, against `torch.cuda.max_memory_allocated` on an
H200, ours of session 1 / ../shared/ANCHORS.md): AudioCraft full fine-tuning, small, batch 16 x 30 s: 34.8
estimated vs 35.2 / 36.8 GiB; peft LoRA 31.5 vs 31.9 / 33.5; HF transformers + peft 33.8 vs 34.2; small batch 4:
full 12.8 vs 13.0 / 13.5, peft LoRA 9.6 vs 9.8 / 10.3; medium batch 8: full 66.3 vs 66.8 / 67.6, peft LoRA 52.3 vs
52.8 / 53.6, HF + peft 55.8 vs 56.3 (benchmarks/README.md). A plan is taken when its estimate is at most HEADROOM of
the budget after RESERVE: what the allocator holds beyond the live tensors (cuBLAS/cuDNN workspaces, rounding and
fragmentation of its blocks).
"""
import dataclasses
import math
import time
import typing as tp

import flashy
import torch
from torch import nn

from . import encoding
from .errors import OutOfMemory
from .memory_estimate import Estimate, StepShape, estimate_step
from .recompute import captured_plan, set_checkpointing
from .plans import PLANS, Plan
from .speed import DTYPES, SpeedSettings, has_fast_dropout, set_dropout_replay, set_keep_merged

HEADROOM = 0.9       # of the budget, for the estimate's error (it runs 1-2% under at MusicGen's sizes)
RESERVE = 2 ** 30    # beyond the tensors: cuBLAS/cuDNN workspaces, allocator blocks (0.5-0.7 GiB seen at batch 4)


def plan_name(plan: Plan) -> str:
    mode, fraction, rest, replay = plan
    if mode == 'none':
        return 'none' + (' (LoRA dropout masks replayed)' if replay else '')
    name = mode if fraction >= 1.0 else f'{mode} on {fraction:g} of the layers'
    return name + (f', {rest} on the others' if rest != 'none' and fraction < 1.0 else '')


def plans_for(model: nn.Module, replay: bool = False) -> tp.List[Plan]:
    """PLANS, without the dropout-replay rung where it would change nothing (no fast-path LoRA dropout), and without
    the no-replay one where `replay` was asked for (`lora.dropout_replay=true`)."""
    with_dropout = has_fast_dropout(model)
    return [plan for plan in PLANS if (with_dropout or not plan[3]) and not (replay and plan == PLANS[0])]


def apply_plan(model: nn.Module, plan: Plan) -> dict:
    """Put the LM on `plan`: its activation checkpointing and whether LoRA dropout masks are replayed."""
    mode, fraction, rest, replay = plan
    info = set_checkpointing(model, mode, fraction, rest)
    if set_dropout_replay(model, replay) and replay:
        info['dropout_replay'] = True
    return info


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


def step_shape(solver: tp.Any) -> tp.Tuple[StepShape, tp.Optional[torch.dtype]]:
    """The shape of the solver's training step on one GPU, and its autocast dtype (None: no autocast)."""
    cfg, cm = solver.cfg, solver.compression_model
    cached = bool(cfg.get('cache') and cfg.cache.get('path') and not cfg.cache.get('write'))
    duration = float(cfg.dataset.segment_duration)
    shape = StepShape(batch=int(cfg.dataset.batch_size),  # per rank here (train.get_solver)
                      frames=ceil_frames(duration, cm.frame_rate),
                      samples=None if cached else int(duration * cm.sample_rate), channels=cm.channels)
    return shape, (DTYPES[cfg.autocast_dtype] if cfg.autocast else None)


def plan_training(solver: tp.Any) -> tp.Optional[dict]:
    """Before the first step: estimate the solver's training step and, with `lora.activation_checkpointing=auto`,
    put its LM on the first plan that fits the budget (updating `solver.speed_settings`); stop with `OutOfMemory`
    when none does. An explicit plan is estimated and warned about when it won't fit. Returns what was estimated
    (None: nothing to plan, i.e. no budget or no training)."""
    settings: SpeedSettings = solver.speed_settings
    auto = settings.activation_checkpointing == 'auto'
    budget = device_budget(settings.memory_budget_gib, solver.device)
    cfg = solver.cfg
    if budget is None or cfg.get('execute_only') is not None:
        if auto:
            solver.speed_settings = dataclasses.replace(settings, activation_checkpointing='none')
        return None
    duration = float(cfg.dataset.segment_duration)
    cm = solver.compression_model
    shape, autocast_dtype = step_shape(solver)
    plans = plans_for(solver.model, replay=settings.dropout_replay) if auto else [
        (settings.activation_checkpointing, float(settings.checkpoint_fraction), settings.checkpoint_rest,
         bool(settings.dropout_replay))]
    start = time.time()

    def log(plan, estimate):
        solver.logger.info("Estimated peak memory per GPU, batch %d x %.1f s, checkpointing %s: %s", shape.batch,
                           duration, plan_name(plan), describe(estimate, budget))
    keep_auto = str(settings.keep_merged_weights).lower() == 'auto' and settings.fast_path
    if keep_auto:  # plans are chosen without the merged weights kept; keeping them is tried on the chosen one
        set_keep_merged(solver.model, False)
    try:
        index, estimate = first_fit(solver.model, cm, shape, autocast_dtype, budget, plans, apply=auto, log=log)
    except Exception as error:  # an op fake tensors can't run must not stop a training that would run
        return _unplanned(solver, auto, error)
    index = _leanest_on_any_rank(index, solver.device) if auto else index
    chosen = plans[min(index, len(plans) - 1)]
    summary = {'plan': plan_name(chosen), 'peak_gib': round(estimate.peak_gib, 3),
               'budget_gib': round(budget / 2 ** 30, 3), 'seconds': round(time.time() - start, 1),
               'needed_bytes': needed(estimate), 'budget_bytes': budget, 'step_bytes': estimate.step}
    if auto:
        apply_plan(solver.model, chosen)
        mode, fraction, rest, replay = chosen
        solver.speed_settings = dataclasses.replace(settings, activation_checkpointing=mode,
                                                    checkpoint_fraction=fraction, checkpoint_rest=rest,
                                                    dropout_replay=replay)
    if index < len(plans):
        solver.logger.info("Activation checkpointing: %s (estimated in %.1f s; this plan would fit up to "
                           "dataset.batch_size=%d per GPU)", plan_name(chosen), time.time() - start,
                           largest_batch(estimate, shape.batch, budget))
        if shape.samples is not None:  # (before the merged weights: the whole batch's encode saves more time)
            encoding.plan(solver, shape, autocast_dtype, budget, summary)
        if keep_auto:
            encode = int(summary.get('encode_bytes') or 0)
            kept = _keep_merged_if_it_fits(solver, cm, shape, autocast_dtype, budget, encode)
            summary['keep_merged_weights'] = kept is not None
            if kept is not None:
                summary['needed_bytes'] = needed(Estimate(resident=kept.resident, step=kept.step + encode))
                summary['step_bytes'] = kept.step
        return summary
    world = flashy.distrib.world_size()
    advice = what_fits(estimate, shape, budget, world)
    message = (f"The training step at dataset.batch_size={shape.batch * world} x {duration:g} s needs an estimated "
               f"{describe(estimate, budget)} (lora.memory_budget_gib={settings.memory_budget_gib}) with activation "
               f"checkpointing {plan_name(chosen)}.")
    if auto:
        raise OutOfMemory(f"{message} No checkpointing plan fits: rerun with {advice}, or more GPUs (the batch is "
                          "split across them), or lora.memory_budget_gib=none to try anyway.")
    solver.logger.warning("%s It will likely run out of memory: lora.activation_checkpointing=auto picks the plan "
                          "that fits, or rerun with %s.", message, advice)
    return summary


def _keep_merged_if_it_fits(solver: tp.Any, compression_model: tp.Optional[nn.Module], shape: StepShape,
                            autocast_dtype: tp.Optional[torch.dtype], budget: int,
                            encode: int = 0) -> tp.Optional[Estimate]:
    """`lora.keep_merged_weights=auto` on the chosen plan: keep the merged weights from forward to backward (one GEMM
    launch fewer per projection) when the step's estimate with them still fits `budget`, EnCodec's `encode` bytes on
    top where encoding.plan counted them so (the step is then estimated without it); returns that estimate if they
    are kept, else None."""
    if not set_keep_merged(solver.model, True):
        return None
    try:
        estimate = estimate_step(solver.model, compression_model,
                                 dataclasses.replace(shape, samples=None) if encode else shape, autocast_dtype)
    except Exception:  # as without the estimate: don't keep them
        estimate = None
    keep = estimate is not None and fits(Estimate(resident=estimate.resident, step=estimate.step + encode), budget)
    if not keep:
        set_keep_merged(solver.model, False)
    solver.logger.info("Merged LoRA weights kept for backward (lora.keep_merged_weights=auto): %s%s", keep,
                       '' if estimate is None else f" (estimated {describe(estimate, budget)})")
    return estimate if keep else None


def _unplanned(solver: tp.Any, auto: bool, error: Exception) -> None:
    """The estimate failed: warn, and train with no checkpointing (auto) or the explicit plan, as without a budget."""
    settings: SpeedSettings = solver.speed_settings
    plan = 'none' if auto else settings.activation_checkpointing
    solver.logger.warning("Could not estimate the training step's peak memory (%s: %s); activation checkpointing: %s. "
                          "Set lora.activation_checkpointing=selective|torch yourself if the GPU runs out of memory, "
                          "or lora.memory_budget_gib=none to skip the estimate.", type(error).__name__, error, plan)
    if auto:
        apply_plan(solver.model, ('none', 1.0, 'none', bool(settings.dropout_replay)))
        solver.speed_settings = dataclasses.replace(settings, activation_checkpointing='none', checkpoint_fraction=1.0,
                                                    checkpoint_rest='none')
    return None


def _leanest_on_any_rank(index: int, device: tp.Any) -> int:
    """With DDP, every rank takes the leanest plan any rank needs (their free memory may differ); the number of
    plans when one rank has none that fits (then every rank stops)."""
    if not flashy.distrib.is_distributed():
        return index
    value = torch.tensor([float(index)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


def plan_graphs(solver: tp.Any) -> int:
    """After `plan_training`: how many input signatures get CUDA graphs of the layers (`lora.graph_layers`,
    `lora.graph_shapes`; 0: none), and install them on the solver's LM. `auto` takes what fits the budget next to the
    step's estimate (each signature's static tensors: `static_bytes`, and room for a step beyond them:
    `fallback_bytes`); `true` takes at least one."""
    from . import layer_graphs
    from .errors import LoRAConfigError
    settings: SpeedSettings = solver.speed_settings
    choice = str(settings.graph_layers).lower()
    layer_graphs.remove(solver.model)
    if choice == 'false':
        return 0
    if torch.device(solver.device).type != 'cuda':
        if choice == 'true':
            raise LoRAConfigError("lora.graph_layers=true needs the solver on a CUDA device (device=cuda); "
                                  "use lora.graph_layers=auto to run without CUDA graphs elsewhere.")
        return 0
    clash = settings.graph_layers_clash()
    planned = getattr(solver, 'memory_estimate', None) or {}
    masks = 0  # bytes the graphed step needs beyond the plan's checkpointed one: LoRA dropout's draws, kept
    if not clash and settings.activation_checkpointing != 'none' and planned:
        # inside a capture LoRA dropout's masks can't be drawn again in backward: kept (~3 bytes an adapted input
        # element more than the checkpointed step the plan fitted), and the layers run torch's selective
        # checkpointing whatever the plan: the graphed step is estimated again as it will run
        encode = int(planned.get('encode_bytes') or 0)
        kept = graphed_step_estimate(solver, encode=not encode)  # (an encode planned on top: the LM's step alone)
        if kept is None:
            clash = (f'lora.activation_checkpointing={settings.activation_checkpointing} (the graphed step, which '
                     'keeps the LoRA dropout masks the plan recomputes, could not be estimated)')
        else:
            solver.logger.info("The graphed step, its checkpointing as captured (what LoRA dropout drew kept: torch's "
                               "masks, or lora.dropout_kernel's seeds): estimated "
                               "%s.", describe(kept, planned.get('budget_bytes')))
            graphed = needed(Estimate(resident=kept.resident, step=kept.step + encode))
            if planned.get('needed_bytes') is not None:
                masks = graphed - int(planned['needed_bytes'])
            planned = dict(planned, needed_bytes=graphed, step_bytes=kept.step)
            if isinstance(getattr(solver, 'memory_estimate', None), dict):  # (what gpu_peak compares the peak with)
                solver.memory_estimate['graphed_needed_bytes'] = graphed
    if clash:
        if choice == 'true':  # (the other clashes are refused when the settings are read: SpeedSettings.validate)
            raise LoRAConfigError(f"lora.graph_layers=true can't be used with {clash}, which the memory plan chose "
                                  "or you set: set lora.graph_layers=auto (it turns itself off then) or change that "
                                  "setting.")
        solver.logger.info("CUDA graphs of the layers (lora.graph_layers=%s): off, with %s.", choice, clash)
        return 0
    shapes = int(settings.graph_shapes)
    if planned.get('budget_bytes') is not None and planned.get('needed_bytes') is not None:
        shared, per_shape, fallback = graph_static_bytes(solver, int(planned.get('step_bytes') or 0))
        fit = graph_signatures_that_fit(int(planned['budget_bytes']), int(planned['needed_bytes']), shared,
                                        per_shape, fallback, int(planned.get('encode_bytes') or 0))
        gib = per_shape / 2 ** 30
        if fit < shapes:
            why = '' if masks <= 0 else (
                f" (inside the graphs the step keeps what LoRA dropout drew, +{masks / 2 ** 30:.2f} GiB over the "
                "plan's step, which draws it again: with lora.dropout=0, or lora.dropout_kernel on CUDA, it keeps "
                "none)")
            solver.logger.info("CUDA graphs of the layers: %d signature(s) of %.2f GiB each fit the memory budget "
                               "next to the step's estimate (lora.graph_shapes=%d)%s.", fit, gib, shapes, why)
        shapes = min(shapes, fit)
        if shapes < 1 and choice == 'true':
            solver.logger.warning("lora.graph_layers=true: the graphs' static tensors (%.2f GiB) don't fit the memory "
                                  "budget next to the step's estimate; the step may run out of memory.", gib)
            shapes = 1
    distributed = flashy.distrib.is_distributed()
    if distributed:  # each rank planned with its own free memory; every rank installs the fewest any holds, or none
        shapes = layer_graphs.all_ranks_agree([shapes], solver.device)[0]
    if shapes < 1:
        return 0
    graphs = layer_graphs.install(solver.model, max_shapes=shapes, strict=choice == 'true', distributed=distributed,
                                  text_bucket=int(settings.graph_text_bucket))
    solver.logger.info("CUDA graphs of the %d transformer layers (lora.graph_layers=%s): up to %d signature(s), "
                       "captured at the first training step of each.", len(graphs.layers), choice, shapes)
    return shapes


def graph_signatures_that_fit(budget: int, needed_bytes: int, shared: int, per_shape: int, fallback: int,
                              encode: int = 0) -> int:
    """How many graph signatures fit `budget` beside a step that needs `needed_bytes` (EnCodec's `encode` counted in
    it, on top of the step): the graphs' `shared` and `per_shape` static tensors, and room for an eager step beyond
    them (`fallback`). That step and the next batch's encode run one after the other outside the graphs' pool, so
    the encode's room serves the fallback too."""
    left = budget - needed_bytes - shared - max(0, fallback - encode)
    return max(0, left // per_shape)


def graphed_step_estimate(solver: tp.Any, encode: bool = True) -> tp.Optional[Estimate]:
    """The solver's training step estimated as the layers' CUDA graphs run its checkpointing plan (LoRA dropout's
    masks kept, not drawn again: recompute.captured_plan), with EnCodec's encode at its time in the step or (`encode`
    false) without it; None where it can't be estimated."""
    shape, autocast_dtype = step_shape(solver)
    if not encode:
        shape = dataclasses.replace(shape, samples=None)
    try:
        with captured_plan(solver.model):
            return estimate_step(solver.model, solver.compression_model, shape, autocast_dtype)
    except Exception as error:
        solver.logger.warning("Could not estimate the graphed step (%s: %s).", type(error).__name__, error)
        return None


def graph_static_bytes(solver: tp.Any, step_bytes: int = 0) -> tp.Tuple[int, int, int]:
    """(`static_bytes`, and `fallback_bytes` for a step of `step_bytes`) for the solver's LM and batch
    (a prepended condition, melody's chroma, counted as long as the tokens)."""
    lm, cfg = solver.model, solver.cfg
    frames = ceil_frames(float(cfg.dataset.segment_duration), solver.compression_model.frame_rate)
    fuser = getattr(lm, 'fuser', None)
    if fuser is not None and getattr(fuser, 'fuse2cond', {}).get('prepend'):
        frames *= 2
    adapter = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    layers, batch, dim = len(lm.transformer.layers), int(cfg.dataset.batch_size), int(lm.dim)
    shared, per_shape = static_bytes(batch, frames, dim, adapter_params=adapter)
    return shared, per_shape, fallback_bytes(layers, batch, frames, dim, step_bytes)


def static_bytes(batch: int, frames: int, dim: int, text_tokens: int = 64,
                 adapter_params: int = 0, itemsize: int = 4) -> tp.Tuple[int, int]:
    """(bytes shared by every signature, bytes each signature adds) that the graphs keep allocated beside their pool
    (which holds a step's activations, as an eager step does): the static input of the layer stack, once; per
    signature the stack's static output and the buffer of its incoming gradient, the text conditioning and the
    adapter gradients. (The stack's input, the frozen embeddings' sum, needs no gradient.) The stream between layers
    is float32 (`itemsize`). The number of layers doesn't count: the stack is one graph each way."""
    activation = batch * frames * dim * itemsize
    return activation, 2 * activation + batch * text_tokens * dim * itemsize + 4 * adapter_params


def fallback_bytes(num_layers: int, batch: int, frames: int, dim: int, step_bytes: int, itemsize: int = 4) -> int:
    """What a step beyond `max_shapes` (eager, each layer recomputed in backward) holds beside the graphs' pool: its
    layer inputs and one layer's share of the step (`step_bytes`: the memory estimate's step)."""
    return num_layers * batch * frames * dim * itemsize + step_bytes // max(1, num_layers)
