"""Our canonical LoRA tensors (AudioCraft LM) -> a Hugging Face PEFT LoRA adapter for transformers' MusicGen.

Fused q/k/v, exactly. AudioCraft's attention projects with one `in_proj_weight` W = [Wq; Wk; Wv] ([3d, d]) and our
LoRA adds `s * B @ A` to it, with A [r, d] and B = [Bq; Bk; Bv] ([3d, r], three row blocks of d rows). Row blocks of
a product are products of row blocks, so

    W + s * B @ A = [Wq + s * Bq @ A;  Wk + s * Bk @ A;  Wv + s * Bv @ A]

and the query projection of the adapted model is `x @ (Wq + s * Bq @ A)^T`: a LoRA pair (A, Bq) on `q_proj` with
the same scaling s; likewise (A, Bk) on `k_proj` and (A, Bv) on `v_proj` (in cross-attention q reads the decoder
stream and k/v the text, as on the AudioCraft side: the split is the same). So each fused pair becomes three PEFT
pairs sharing one copy of A each. Nothing is approximated; the only thing PEFT can't express is the *sharing* of A
(three independent copies after export: further HF training would untie them) and per-target dropout (our fused
q/k/v has none, the Linear targets have `lora.dropout`; PEFT has one `lora_dropout` for all: we write ours).

Module map (AudioCraft canonical -> HF, under `decoder.model.decoder.layers.{i}`)::

    self_attn.in_proj        -> self_attn.{q,k,v}_proj      self_attn.out_proj        -> self_attn.out_proj
    cross_attention.in_proj  -> encoder_attn.{q,k,v}_proj   cross_attention.out_proj  -> encoder_attn.out_proj
    linear1 / linear2        -> fc1 / fc2

PEFT keys are `base_model.model.<module>.lora_{A,B}.weight` (what `PeftModel.save_pretrained` writes).
"""
import re
import typing as tp

import torch

from .lm_map import HF_DECODER, LINEAR_MAP

PEFT_PREFIX = 'base_model.model.'
WEIGHTS_NAME = 'adapter_model.safetensors'
_CANONICAL = re.compile(r'^transformer\.layers\.(\d+)\.(.+)\.(lora_[AB])\.weight$')
_FUSED = {'self_attn.in_proj': 'self_attn', 'cross_attention.in_proj': 'encoder_attn'}


def canonical_to_peft(adapter_state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """Map canonical adapter tensors to PEFT's names for `MusicgenForConditionalGeneration` (see module doc).

    Raises:
        KeyError: naming a canonical key with no HF counterpart.
    """
    out: tp.Dict[str, torch.Tensor] = {}
    for key, tensor in adapter_state.items():
        match = _CANONICAL.match(key)
        if match is None:
            raise KeyError(f"Adapter key {key!r} is not a canonical audiocraft-lora name (transformer.layers.*).")
        layer, module, which = match.groups()
        base = f'{PEFT_PREFIX}{HF_DECODER}.layers.{layer}.'
        if module in _FUSED:
            attn = _FUSED[module]
            parts = [tensor] * 3 if which == 'lora_A' else list(tensor.chunk(3, dim=0))
            for proj, part in zip(('q_proj', 'k_proj', 'v_proj'), parts):
                out[f'{base}{attn}.{proj}.{which}.weight'] = part.detach().to(torch.float32).contiguous().clone()
        elif module in LINEAR_MAP:
            out[f'{base}{LINEAR_MAP[module]}.{which}.weight'] = tensor.detach().to(torch.float32).contiguous()
        else:
            raise KeyError(f"Adapter key {key!r}: module {module!r} has no Hugging Face MusicGen counterpart.")
    return out


def target_modules_regex(peft_state: tp.Mapping[str, torch.Tensor]) -> str:
    """A `target_modules` regex (fully matched by peft) covering exactly the modules adapted in `peft_state`."""
    suffixes = sorted({re.sub(r'^.*\.layers\.\d+\.', '', k[len(PEFT_PREFIX):].rsplit('.lora_', 1)[0])
                       for k in peft_state})
    alternatives = '|'.join(re.escape(s) for s in suffixes)
    return rf'^{re.escape(HF_DECODER)}\.layers\.\d+\.({alternatives})$'


def write_peft_adapter(folder: tp.Any, adapter_state: tp.Mapping[str, torch.Tensor], rank: int, alpha: float,
                       dropout: float, use_rslora: bool, base_model_name_or_path: tp.Optional[str]) -> None:
    """Write `adapter_config.json` (through peft's own `LoraConfig`) + `adapter_model.safetensors` into `folder`."""
    from peft import LoraConfig
    from safetensors.torch import save as safetensors_save
    from ..checkpoint_io import atomic_write
    peft_state = canonical_to_peft(adapter_state)
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), use_rslora=bool(use_rslora),
                        target_modules=target_modules_regex(peft_state), bias='none', init_lora_weights=True,
                        base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    config.save_pretrained(str(folder))
    with atomic_write(f'{folder}/{WEIGHTS_NAME}') as f:
        f.write(safetensors_save(peft_state, metadata={'format': 'pt'}))
