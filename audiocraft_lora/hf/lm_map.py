"""MusicGen's LM: HF `MusicgenForConditionalGeneration` decoder <-> AudioCraft `LMModel`, weights and config.

Key map (HF name inside the full model's state dict -> AudioCraft LM state dict), per decoder layer `i`::

    decoder.model.decoder.embed_tokens.{k}.weight              -> emb.{k}.weight               [card + 1, dim]
    decoder.model.decoder.layers.{i}.self_attn.{q,k,v}_proj     -> transformer.layers.{i}.self_attn.in_proj_weight
                                                                   (cat([q, k, v], 0): [3 * dim, dim])
    decoder.model.decoder.layers.{i}.self_attn.out_proj         -> transformer.layers.{i}.self_attn.out_proj
    decoder.model.decoder.layers.{i}.self_attn_layer_norm       -> transformer.layers.{i}.norm1
    decoder.model.decoder.layers.{i}.encoder_attn.{q,k,v}_proj  -> transformer.layers.{i}.cross_attention.in_proj_weight
    decoder.model.decoder.layers.{i}.encoder_attn.out_proj      -> transformer.layers.{i}.cross_attention.out_proj
    decoder.model.decoder.layers.{i}.encoder_attn_layer_norm    -> transformer.layers.{i}.norm_cross
    decoder.model.decoder.layers.{i}.fc1 / fc2                  -> transformer.layers.{i}.linear1 / linear2
    decoder.model.decoder.layers.{i}.final_layer_norm           -> transformer.layers.{i}.norm2
    decoder.model.decoder.layer_norm                            -> out_norm
    decoder.lm_heads.{k}.weight                                 -> linears.{k}.weight           [card, dim]

The conditioner projections (`enc_to_dec_proj`, melody's `audio_enc_to_dec_proj`) are mapped by `projection`.
Both implementations are pre-norm, bias-free (attention, feed-forward, heads), exact-GELU, with the same
sinusoidal positions (cos first, period 10000) added to the summed codebook embeddings and no embedding scale.
"""
import typing as tp

import torch

from ..errors import BaseModelError

HF_DECODER = 'decoder.model.decoder'
HF_HEADS = 'decoder.lm_heads'
# per-layer HF suffix -> AudioCraft suffix (weights that map one to one)
_LAYER_MAP: tp.Dict[str, str] = {
    'self_attn.out_proj.weight': 'self_attn.out_proj.weight',
    'self_attn_layer_norm.weight': 'norm1.weight',
    'self_attn_layer_norm.bias': 'norm1.bias',
    'encoder_attn.out_proj.weight': 'cross_attention.out_proj.weight',
    'encoder_attn_layer_norm.weight': 'norm_cross.weight',
    'encoder_attn_layer_norm.bias': 'norm_cross.bias',
    'fc1.weight': 'linear1.weight',
    'fc2.weight': 'linear2.weight',
    'final_layer_norm.weight': 'norm2.weight',
    'final_layer_norm.bias': 'norm2.bias',
}
# HF attention module -> AudioCraft attention module (q/k/v fused into `in_proj_weight` on the AudioCraft side)
ATTENTION_MAP: tp.Dict[str, str] = {'self_attn': 'self_attn', 'encoder_attn': 'cross_attention'}
# AudioCraft module (LoRA canonical name part) -> HF module, for the one-to-one Linear modules
LINEAR_MAP: tp.Dict[str, str] = {
    'self_attn.out_proj': 'self_attn.out_proj',
    'cross_attention.out_proj': 'encoder_attn.out_proj',
    'linear1': 'fc1',
    'linear2': 'fc2',
}


def _take(state: tp.Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise BaseModelError(f"The Hugging Face MusicGen weights have no {key!r}: is this a MusicGen saved by "
                             "transformers' save_pretrained (MusicgenForConditionalGeneration)?")
    return state[key]


def hf_to_audiocraft_decoder(hf_state: tp.Mapping[str, torch.Tensor], num_layers: int, num_codebooks: int,
                             cross_attention: bool) -> tp.Dict[str, torch.Tensor]:
    """Map the HF decoder + heads to AudioCraft's LM keys (`emb`, `transformer.layers`, `out_norm`, `linears`).

    Args:
        hf_state: state dict of the full HF model (`MusicgenForConditionalGeneration` or the melody one).
        num_layers: decoder layers. num_codebooks: K (codebooks of all channels).
        cross_attention: whether the decoder has `encoder_attn` (text models) or not (melody, prepend).
    Returns:
        dict: AudioCraft LM tensors (no conditioner keys), cloned and contiguous.
    """
    out: tp.Dict[str, torch.Tensor] = {}
    for k in range(num_codebooks):
        out[f'emb.{k}.weight'] = _take(hf_state, f'{HF_DECODER}.embed_tokens.{k}.weight')
        out[f'linears.{k}.weight'] = _take(hf_state, f'{HF_HEADS}.{k}.weight')
    for i in range(num_layers):
        src, dst = f'{HF_DECODER}.layers.{i}.', f'transformer.layers.{i}.'
        for hf_attn, ac_attn in ATTENTION_MAP.items():
            if hf_attn == 'encoder_attn' and not cross_attention:
                continue
            qkv = [_take(hf_state, f'{src}{hf_attn}.{p}_proj.weight') for p in 'qkv']
            out[f'{dst}{ac_attn}.in_proj_weight'] = torch.cat(qkv, dim=0)
        for hf_suffix, ac_suffix in _LAYER_MAP.items():
            if hf_suffix.startswith('encoder_attn') and not cross_attention:
                continue
            out[dst + ac_suffix] = _take(hf_state, src + hf_suffix)
    out['out_norm.weight'] = _take(hf_state, f'{HF_DECODER}.layer_norm.weight')
    out['out_norm.bias'] = _take(hf_state, f'{HF_DECODER}.layer_norm.bias')
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def audiocraft_to_hf_decoder(ac_state: tp.Mapping[str, torch.Tensor], num_layers: int, num_codebooks: int,
                             cross_attention: bool) -> tp.Dict[str, torch.Tensor]:
    """Inverse of `hf_to_audiocraft_decoder`: split each fused `in_proj_weight` [3 * dim, dim] into q, k, v."""
    out: tp.Dict[str, torch.Tensor] = {}
    for k in range(num_codebooks):
        out[f'{HF_DECODER}.embed_tokens.{k}.weight'] = ac_state[f'emb.{k}.weight']
        out[f'{HF_HEADS}.{k}.weight'] = ac_state[f'linears.{k}.weight']
    for i in range(num_layers):
        src, dst = f'transformer.layers.{i}.', f'{HF_DECODER}.layers.{i}.'
        for hf_attn, ac_attn in ATTENTION_MAP.items():
            if hf_attn == 'encoder_attn' and not cross_attention:
                continue
            q, k, v = ac_state[f'{src}{ac_attn}.in_proj_weight'].chunk(3, dim=0)
            for name, tensor in zip('qkv', (q, k, v)):
                out[f'{dst}{hf_attn}.{name}_proj.weight'] = tensor
        for hf_suffix, ac_suffix in _LAYER_MAP.items():
            if hf_suffix.startswith('encoder_attn') and not cross_attention:
                continue
            out[dst + hf_suffix] = ac_state[src + ac_suffix]
    out[f'{HF_DECODER}.layer_norm.weight'] = ac_state['out_norm.weight']
    out[f'{HF_DECODER}.layer_norm.bias'] = ac_state['out_norm.bias']
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def projection(hf_state: tp.Mapping[str, torch.Tensor], name: str, in_dim: int,
               out_dim: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Weight [out_dim, in_dim] and bias [out_dim] of an HF projection, or the identity when HF has none.

    HF only creates `enc_to_dec_proj` (`audio_enc_to_dec_proj`) when the widths differ and otherwise feeds the encoder
    output as is; AudioCraft's conditioners always have an `output_proj` Linear (with bias): identity + zero bias.
    """
    if f'{name}.weight' in hf_state:
        return (hf_state[f'{name}.weight'].detach().clone(), hf_state[f'{name}.bias'].detach().clone())
    if in_dim != out_dim:
        raise BaseModelError(f"The HF model has no {name} although its widths differ ({in_dim} -> {out_dim}).")
    return torch.eye(out_dim), torch.zeros(out_dim)


def check_supported(decoder_cfg: tp.Any) -> None:
    """Refuse HF decoder settings that AudioCraft's LM can't express."""
    if getattr(decoder_cfg, 'scale_embedding', False):
        raise BaseModelError("The HF decoder config has scale_embedding=true (embeddings multiplied by sqrt(dim)); "
                             "AudioCraft's LM has no such scale. Released MusicGens use false.")
    if getattr(decoder_cfg, 'activation_function', 'gelu') not in ('gelu', 'relu'):
        raise BaseModelError(f"The HF decoder uses activation_function={decoder_cfg.activation_function!r}; only "
                             "'gelu' and 'relu' map to AudioCraft's transformer.")
    if getattr(decoder_cfg, 'cross_attention_hidden_size', None) is not None:
        raise BaseModelError("The HF decoder sets cross_attention_hidden_size: AudioCraft's cross-attention has the "
                             "decoder width on both sides.")
    if decoder_cfg.hidden_size % decoder_cfg.num_attention_heads:
        raise BaseModelError("hidden_size is not divisible by num_attention_heads in the HF decoder config.")
    if decoder_cfg.audio_channels == 2 and decoder_cfg.num_codebooks % 2:
        raise BaseModelError("A stereo HF MusicGen must have an even num_codebooks (left/right interleaved).")


def delays(num_codebooks: int, audio_channels: int) -> tp.List[int]:
    """MusicGen's delay pattern: [0, 1, ..., K-1] (mono) or [0, 0, 1, 1, ...] (stereo, codebooks interleaved L/R)."""
    if audio_channels == 2:
        return [k // 2 for k in range(num_codebooks)]
    return list(range(num_codebooks))


def lm_config(decoder_cfg: tp.Any, sample_rate: int, text_encoder_name: str, cfg_coef: float,
              melody: tp.Optional[tp.Dict[str, tp.Any]] = None) -> tp.Dict[str, tp.Any]:
    """The AudioCraft `xp.cfg` (as a plain dict) that rebuilds the HF decoder as an `LMModel`.

    Args:
        decoder_cfg: HF `MusicgenDecoderConfig` (or the melody one).
        sample_rate: the audio encoder's sampling rate.
        text_encoder_name: name given to AudioCraft's `T5Conditioner` (see `t5_local`).
        cfg_coef: classifier-free guidance scale used at inference (HF `generation_config.guidance_scale`).
        melody: for melody models, the `chroma_stem` conditioner settings; `None` for text (cross-attention) models.
    """
    check_supported(decoder_cfg)
    channels = int(decoder_cfg.audio_channels)
    n_q = int(decoder_cfg.num_codebooks)
    conditioners: tp.Dict[str, tp.Any] = {
        'description': {'model': 't5', 't5': {'name': text_encoder_name, 'finetune': False, 'word_dropout': 0.3,
                                              'normalize_text': False}}}
    if melody is None:
        fuser = {'cross_attention_pos_emb': False, 'cross_attention_pos_emb_scale': 1, 'sum': [], 'prepend': [],
                 'cross': ['description'], 'input_interpolate': []}
        attribute_dropout: tp.Dict[str, tp.Any] = {}
    else:
        conditioners['self_wav'] = {'model': 'chroma_stem', 'chroma_stem': dict(melody)}
        # AudioCraft prepends in the order the provider returns them (text, then wav): [chroma, text, codes], as HF.
        fuser = {'cross_attention_pos_emb': False, 'cross_attention_pos_emb_scale': 1, 'sum': [],
                 'prepend': ['self_wav', 'description'], 'cross': [], 'input_interpolate': []}
        attribute_dropout = {}
    return {
        'solver': 'musicgen',
        'lm_model': 'transformer_lm',
        'device': 'cpu',
        'dtype': 'float32',
        'sample_rate': int(sample_rate),
        'channels': channels,
        'compression_model_n_q': None,
        'interleave_stereo_codebooks': {'use': channels == 2, 'per_timestep': False},
        'dataset': {'segment_duration': 30},
        'codebooks_pattern': {'modeling': 'delay', 'delay': {'delays': delays(n_q, channels), 'flatten_first': 0,
                                                             'empty_initial': 0}},
        'transformer_lm': {
            'dim': int(decoder_cfg.hidden_size), 'num_heads': int(decoder_cfg.num_attention_heads),
            'num_layers': int(decoder_cfg.num_hidden_layers),
            'hidden_scale': decoder_cfg.ffn_dim / decoder_cfg.hidden_size, 'n_q': n_q,
            'card': int(decoder_cfg.vocab_size), 'dropout': 0.0, 'emb_lr': None,
            'activation': decoder_cfg.activation_function, 'norm_first': True, 'bias_ff': False, 'bias_attn': False,
            'bias_proj': False, 'past_context': None, 'causal': True, 'custom': False, 'memory_efficient': True,
            'attention_as_float32': False, 'layer_scale': None, 'positional_embedding': 'sin', 'xpos': False,
            'checkpointing': 'none', 'weight_init': 'gaussian', 'depthwise_init': 'current',
            'zero_bias_init': True, 'norm': 'layer_norm', 'cross_attention': melody is None,
            'qk_layer_norm': False, 'qk_layer_norm_cross': False, 'attention_dropout': None, 'kv_repeat': 1,
            'two_step_cfg': False,
        },
        'classifier_free_guidance': {'training_dropout': 0.3, 'inference_coef': float(cfg_coef)},
        'attribute_dropout': attribute_dropout,
        'fuser': fuser,
        'conditioners': conditioners,
    }
