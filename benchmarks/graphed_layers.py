"""CUDA graphs of the eager transformer layers (`torch.cuda.make_graphed_callables`): the `lora_graphed` case of
step_time.py, a benchmark, not a solver setting.

At batch 4 a LoRA step is bound by the host (launches and Python: `gpu_model.py` puts its GPU work at ~0.65x of full
fine-tuning's, its host time above it). A graph per layer replays that layer's forward and, in backward, its
backward as one launch each, with the very kernels eager mode runs (so the same values as eager, unlike inductor's),
and none of the Python of AudioCraft's attention, peft or `fast_lora` at replay. `lora_compile_ro` is the other way
to the same end (inductor's kernels under CUDA graphs).

What graphing needs, and how the case provides it: static shapes (a graph per input shape; training batches have
one), no CPU synchronisation inside a layer, graph-safe randomness (CUDA's default generator is), and nothing
stateful that a replay would skip: the shared adapter casts (adapter_casts) are refreshed by a Python staleness check,
so graphed layers cast their adapters themselves (`unshare_adapter_casts`), inside the graph. Evaluation (no grad)
and AudioCraft's streaming generation run the eager layer.
"""
import typing as tp

import torch
from torch import nn


class _LayerCall(nn.Module):
    """`layer(x, cross_attention_src=c)` with positional tensors only (what make_graphed_callables accepts)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        return self.layer(x, cross_attention_src=cross)


class GraphedLayer(nn.Module):
    """An AudioCraft transformer layer whose training calls replay CUDA graphs (one per input shape and grad
    pattern, captured at the first call of each); other calls run the layer eagerly."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.graphs: tp.Dict[tp.Any, tp.Callable] = {}

    def forward(self, x: torch.Tensor, *args, cross_attention_src: tp.Optional[torch.Tensor] = None,
                src_mask: tp.Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if (args or kwargs or src_mask is not None or cross_attention_src is None or not self.training
                or not torch.is_grad_enabled() or x.device.type != 'cuda'):
            return self.layer(x, *args, cross_attention_src=cross_attention_src, src_mask=src_mask, **kwargs)
        key = (tuple(x.shape), x.dtype, x.requires_grad, tuple(cross_attention_src.shape), cross_attention_src.dtype,
               torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda'))
        graphed = self.graphs.get(key)
        if graphed is None:
            samples = (x.detach().clone().requires_grad_(x.requires_grad), cross_attention_src.detach().clone())
            cache = torch.is_autocast_cache_enabled()
            torch.set_autocast_cache_enabled(False)  # (graphs can't hold autocast's cached casts; same values)
            try:
                graphed = torch.cuda.make_graphed_callables(_LayerCall(self.layer), samples, num_warmup_iters=3)
            finally:
                torch.set_autocast_cache_enabled(cache)
            self.graphs[key] = graphed
        return graphed(x, cross_attention_src)


def unshare_adapter_casts(model: nn.Module) -> int:
    """Take the model's shared adapter casts away (each projection casts its own adapter again); returns how many
    modules had them."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop('_lora_cast_slots', None) is not None:
            count += 1
    return count


def graph_layers(lm: nn.Module) -> int:
    """Wrap every transformer layer of an AudioCraft LM in `GraphedLayer` (in place); returns how many. The layers'
    parameter names gain `.layer`: a benchmark-only model, not one to save."""
    unshare_adapter_casts(lm)
    layers = lm.transformer.layers
    for index, layer in enumerate(layers):
        layers[index] = GraphedLayer(layer)
    return len(layers)
