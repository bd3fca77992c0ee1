"""The GPU memory a training epoch took at its peak, next to what the memory plan estimated (memory_plan.py).

Train epochs on CUDA report `gpu_peak_gib`: `torch.cuda.max_memory_reserved` over the epoch (what the caching
allocator held from the GPU at the peak: the layers' CUDA graphs' pool, EnCodec's encode and the allocator's
rounding included; what runs out first). The first epoch also logs it against the plan's estimate, so a run shows
how close `lora.activation_checkpointing=auto` and `lora.encode_chunk=auto` planned (and what room is left for
`dataset.batch_size`).
"""
import typing as tp

import torch

GIB = 2 ** 30


def start_epoch(device: tp.Any) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def epoch_peak(device: tp.Any) -> tp.Optional[tp.Tuple[int, int]]:
    """(reserved, allocated) bytes at the epoch's peak on CUDA; None elsewhere."""
    if torch.device(device).type != 'cuda':
        return None
    return torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)


def describe(reserved: int, allocated: int, planned: tp.Optional[dict]) -> str:
    """One line: the peak, and what the plan counted with its margin (memory_plan.plan_training's summary: the step,
    EnCodec's encode beside it) of its budget. A peak above what the plan counted is worth a note."""
    text = f"GPU memory at this epoch's peak: {reserved / GIB:.2f} GiB reserved ({allocated / GIB:.2f} GiB in tensors)"
    if planned and planned.get('needed_bytes') and planned.get('budget_bytes'):
        # (the graphed step's figure where plan_graphs estimated it again: what runs)
        needed = int(planned.get('graphed_needed_bytes') or planned['needed_bytes'])
        budget = int(planned['budget_bytes'])
        text += (f"; the memory plan ({planned.get('plan')}) counted {needed / GIB:.2f} GiB with its margin "
                 f"({reserved / needed:.2f}x of it), of a budget of {budget / GIB:.2f} GiB")
    return text + '.'
