"""The adapter weights in the autocast dtype, cast once per optimizer step for the whole model, not at every use.

Under autocast the fast path (fast_lora) computes in bf16/fp16 while the LoRA weights stay float32 (the optimizer's
masters), so every adapted projection cast its A and B at every forward: two small kernels each, 8 projections a
layer (AudioCraft's cross-attention splits q/k/v into three), ~400 launches a step at musicgen-small's 24 layers, in
a step that is bound by kernel launches at small batches. `AdapterCasts` keeps a compute-dtype copy of every adapter
weight of a model; the first projection that finds its copy stale refreshes every stale copy of the model with one
`torch._foreach_copy_`. A copy is stale after any optimizer step (a global step post-hook counts them: torch's fused
AdamW, the solver's on CUDA, updates weights in place without moving their version counters), when the weight's
version counter moved (`load_state_dict`, in-place writes under no_grad), or for another dtype or device. The values
are the same casts, so no result changes (tests/test_adapter_casts.py).

A module reads its copy through `lookup(slot, weight, dtype)`, which gives None (the caller casts, as before) where a
copy can't stand in: the module's weight is not the Parameter registered here (replaced since) or no cast is needed;
fast_lora does not ask on fake tensors (the memory estimate) or inside `torch.compile` (the casts are part of the
compiled graph there).
A weight written in place through `.data` outside an optimizer step (which moves no version counter) is not seen:
set it with `copy_` under `torch.no_grad()`, as `load_state_dict` does.
"""
import typing as tp

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ['AdapterCasts', 'share_adapter_casts', 'unshare_adapter_casts', 'lookup']

Slot = tp.Tuple['AdapterCasts', int]

_OPTIMIZER_STEPS = [0]  # optimizer steps taken in this process (any optimizer), counted by the hook below


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)  # once per process: after any step, every copy is stale


def _storage(weight: torch.Tensor) -> int:
    return weight.data_ptr()


class AdapterCasts:
    """Compute-dtype copies of a list of float32 adapter weights, refreshed together."""

    def __init__(self, weights: tp.Sequence[torch.Tensor] = ()):
        self.weights: tp.List[torch.Tensor] = []
        self.copies: tp.List[tp.Optional[torch.Tensor]] = []
        self.stamps: tp.List[tp.Any] = []  # (optimizer steps, version, data_ptr, dtype) of the last refresh
        self.refreshes = 0  # how many times `refresh` copied something (tests, benchmarks)
        for weight in weights:
            self.add(weight)

    def add(self, weight: torch.Tensor) -> Slot:
        """Hold a copy of `weight` from now on; returns its slot."""
        self.weights.append(weight)
        self.copies.append(None)
        self.stamps.append(None)
        return self, len(self.weights) - 1

    def _stamp(self, index: int, dtype: torch.dtype) -> tp.Tuple[int, int, int, torch.dtype]:
        weight = self.weights[index]
        return _OPTIMIZER_STEPS[0], weight._version, _storage(weight), dtype

    def get(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        """The copy of weight `index` in `dtype`, refreshing every stale copy first if this one is stale."""
        if self.stamps[index] != self._stamp(index, dtype):
            self.refresh(dtype)
        copy = self.copies[index]
        assert copy is not None
        return copy

    def refresh(self, dtype: torch.dtype) -> int:
        """Bring every copy that is stale for `dtype` up to date (one foreach copy); returns how many were."""
        stale = [i for i in range(len(self.weights)) if self.stamps[i] != self._stamp(i, dtype)]
        if not stale:
            return 0
        # (normal tensors even when asked under inference_mode: a training step saves them for backward later)
        with torch.no_grad(), torch.inference_mode(False):
            for i in stale:
                weight, copy = self.weights[i], self.copies[i]
                if (copy is None or copy.dtype != dtype or copy.device != weight.device
                        or copy.shape != weight.shape):
                    self.copies[i] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            torch._foreach_copy_([self.copies[i] for i in stale], [self.weights[i].detach() for i in stale])
        for i in stale:
            self.stamps[i] = self._stamp(i, dtype)
        self.refreshes += 1
        return len(stale)


def lookup(slot: tp.Optional[Slot], weight: torch.Tensor, dtype: torch.dtype) -> tp.Optional[torch.Tensor]:
    """`weight` in `dtype` from its shared copy, or None where the caller should cast it itself: no slot, no cast
    needed, or the module's weight is not the one registered (replaced since). Callers don't ask under fake tensors
    (the memory estimate) or inside torch.compile, where the casts belong to the compiled graph."""
    if slot is None or weight.dtype == dtype:
        return None
    casts, index = slot
    if casts.weights[index] is not weight:
        return None
    return casts.get(index, dtype)


def share_adapter_casts(model: nn.Module) -> int:
    """Give every fast-path adapted projection of `model` a slot in one `AdapterCasts` (replacing earlier ones);
    returns how many weights it holds."""
    from .fast_lora import FastLoraLinear
    from .fused_in_proj import FusedInProjLoRA
    casts = AdapterCasts()
    for module in model.modules():
        if isinstance(module, FastLoraLinear):  # per peft adapter name
            pairs = {name: (module.lora_A[name].weight, module.lora_B[name].weight)
                     for name in module.lora_A.keys() if name in module.lora_B}
        elif isinstance(module, FusedInProjLoRA):
            pairs = {'': (module.lora_A.weight, module.lora_B.weight)}
        else:
            continue
        module.__dict__['_lora_cast_slots'] = {name: (casts.add(a), casts.add(b)) for name, (a, b) in pairs.items()}
    return len(casts.weights)


def slots_of(module: nn.Module, name: str = '') -> tp.Tuple[tp.Optional[Slot], tp.Optional[Slot]]:
    """The (A, B) slots `share_adapter_casts` gave `module` for adapter `name` ('' for a fused in_proj), or Nones."""
    slots = module.__dict__.get('_lora_cast_slots')
    if not slots or name not in slots:
        return None, None
    return slots[name]


def unshare_adapter_casts(model: nn.Module) -> int:
    """Take `share_adapter_casts` back: each projection of `model` casts its own adapter again (what a CUDA graph of
    a layer needs: a replay runs no Python staleness check). Returns how many modules had slots."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop('_lora_cast_slots', None) is not None:
            count += 1
    return count
