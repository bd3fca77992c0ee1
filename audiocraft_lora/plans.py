"""The ladder of memory plans, least recompute first, and what to rerun with after a step ran out of memory.

`lora.activation_checkpointing=auto` takes the first plan that fits (memory_plan); a training step that still runs
out of GPU memory is told the next rung (`out_of_memory_advice`, raised by the solver).
"""
import typing as tp

from .speed import SpeedSettings

__all__ = ['Plan', 'PLANS', 'PLAN_COSTS', 'plan_overrides', 'out_of_memory_advice']


# Leaner and leaner memory plans, least recompute first: what `activation_checkpointing=auto` tries (memory_plan) and
# what a step that ran out of memory is told to try next. A plan: (checkpointing, fraction, rest, dropout_replay).
Plan = tp.Tuple[str, float, str, bool]
PLANS: tp.Tuple[Plan, ...] = (
    ('none', 1.0, 'none', False),
    ('none', 1.0, 'none', True),  # only where the fast path has LoRA dropout (else it equals the first)
    ('selective', 1.0, 'none', False),
    ('torch', 0.5, 'selective', False),
    ('torch', 1.0, 'none', False),
)
PLAN_COSTS = {
    PLANS[1]: 'keeps no LoRA dropout mask, ~-11% memory at dropout 0.05, one more dropout pass',
    PLANS[2]: 'about 0.6x the activation memory for almost no extra compute',
    PLANS[3]: 'about a third of the activation memory, ~+25% compute',
    PLANS[4]: 'layer inputs only, ~+50% compute',
}


def plan_overrides(plan: Plan) -> str:
    """The `lora.*` keys that select `plan` on the command line."""
    mode, fraction, rest, replay = plan
    if mode == 'none':
        return f'lora.dropout_replay={replay}'
    return f'lora.activation_checkpointing={mode} lora.checkpoint_fraction={fraction} lora.checkpoint_rest={rest}'


def _plan_position(settings: SpeedSettings) -> float:
    """Where `settings` sit among PLANS (an index; a half-way plan sits between its neighbours)."""
    mode, fraction = settings.activation_checkpointing, float(settings.checkpoint_fraction)
    if mode in ('none', 'auto'):
        return 1 if settings.dropout_replay else 0
    if mode == 'selective':
        return 2 if fraction >= 1.0 else 1.5
    if fraction >= 1.0:
        return 4
    if settings.checkpoint_rest == 'selective' and fraction >= 0.5:
        return 3
    return 2.5


def out_of_memory_advice(settings: SpeedSettings, batch_size: int, segment_duration: float, error: str,
                         lora_dropout: bool = False, graphs: bool = False) -> str:
    """What to change after a training step ran out of GPU memory: the next leaner plan (replayed dropout masks first
    when the fast path has `lora_dropout`), then batch size / segment length. Speed settings are outside the XP
    signature, so rerunning resumes the same XP."""
    position = _plan_position(settings)
    lines = [f"The GPU ran out of memory in a training step ({error.splitlines()[0] if error else 'OutOfMemoryError'}) "
             f"with dataset.batch_size={batch_size}, dataset.segment_duration={segment_duration}, "
             f"lora.activation_checkpointing={settings.activation_checkpointing} "
             f"(checkpoint_fraction={settings.checkpoint_fraction}, checkpoint_rest={settings.checkpoint_rest})."]
    if graphs:  # (their pool and static tensors come first: they only buy speed)
        lines.append("The transformer layers ran as CUDA graphs (lora.graph_layers), whose memory pool and static "
                     "tensors stay allocated: rerun the same command with `lora.graph_layers=false` first (outside "
                     "the XP signature: it resumes from the last checkpoint), or a smaller `lora.graph_shapes`.")
    replay_helps = lora_dropout and settings.fast_path
    for index, plan in enumerate(PLANS):
        if index > position and (replay_helps or not plan[3]):
            lines.append(f"Rerun the same command with `{plan_overrides(plan)}` ({PLAN_COSTS[plan]}): these keys are "
                         "outside the XP signature, so it resumes from the last checkpoint.")
            break
    lines.append(f"Or lower dataset.batch_size (now {batch_size}; keep the effective batch with more GPUs) or "
                 f"dataset.segment_duration (now {segment_duration} s). If other processes use this GPU, give "
                 "lora.activation_checkpointing=auto a smaller lora.memory_budget_gib (GiB) to plan for. Plan without "
                 "a GPU: `python benchmarks/memory_plan.py --scale small --batch B --seconds S`.")
    return ' '.join(lines)
