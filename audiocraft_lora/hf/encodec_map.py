"""HF `EncodecModel` (a MusicGen's `audio_encoder`) -> AudioCraft's SEANet + RVQ `EncodecModel` package.

Both are the EnCodec architecture with the same layer order, so keys map by renaming::

    encoder.layers.{j}.conv.parametrizations.weight.original0 -> encoder.model.{j}.conv.conv.weight_g   (weight norm g)
    encoder.layers.{j}.conv.parametrizations.weight.original1 -> encoder.model.{j}.conv.conv.weight_v   (weight norm v)
    encoder.layers.{j}.conv.bias                              -> encoder.model.{j}.conv.conv.bias
    encoder.layers.{j}.block.{b}.conv.* / shortcut.conv.*     -> encoder.model.{j}.block.{b}.conv.conv.* / ...
    encoder.layers.{j}.norm.*                                 -> encoder.model.{j}.conv.norm.*   (time_group_norm)
    encoder.layers.{j}.lstm.*                                 -> encoder.model.{j}.lstm.*
    decoder.layers.{j}.conv.*  (transposed conv)              -> decoder.model.{j}.convtr.convtr.*
    quantizer.layers.{q}.codebook.{embed,...}                 -> quantizer.vq.layers.{q}._codebook.{embed,...}

Padding: HF pads its convolutions with `config.pad_mode` ('reflect' for MusicGen's 32 kHz EnCodec) while
AudioCraft's SEANet default is 'constant'; the converted config carries HF's pad mode so codes are identical.
"""
import re
import typing as tp

import torch

from ..errors import BaseModelError

_SUFFIXES: tp.Dict[str, str] = {
    'parametrizations.weight.original0': 'weight_g',
    'parametrizations.weight.original1': 'weight_v',
    'weight_g': 'weight_g',
    'weight_v': 'weight_v',
    'weight': 'weight',
    'bias': 'bias',
}


def num_quantizers_for_lm(decoder_num_codebooks: int, audio_channels: int) -> int:
    """Codebooks per channel that the LM models (stereo MusicGens interleave two mono EnCodec streams)."""
    return decoder_num_codebooks // audio_channels


def compression_config(encodec_cfg: tp.Any, n_q: int) -> tp.Dict[str, tp.Any]:
    """AudioCraft `xp.cfg` (plain dict) of a SEANet + RVQ EnCodec equivalent to the HF `EncodecConfig`."""
    if getattr(encodec_cfg, 'chunk_length_s', None):
        raise BaseModelError("The HF audio encoder is chunked (chunk_length_s set); AudioCraft's EnCodec encodes "
                             "whole signals. MusicGen's EnCodec (facebook/encodec_32khz) has chunk_length_s=null.")
    if encodec_cfg.audio_channels != 1:
        raise BaseModelError("The HF audio encoder is not mono: MusicGen (also stereo MusicGen) uses a mono EnCodec.")
    codebook_dim = encodec_cfg.codebook_dim or encodec_cfg.hidden_size
    if codebook_dim != encodec_cfg.hidden_size:
        raise BaseModelError(f"The HF audio encoder has codebook_dim={codebook_dim} != hidden_size="
                             f"{encodec_cfg.hidden_size}; AudioCraft's RVQ quantizes the encoder output directly.")
    if encodec_cfg.norm_type not in ('weight_norm', 'time_group_norm'):
        raise BaseModelError(f"Unsupported EnCodec norm_type={encodec_cfg.norm_type!r}.")
    sample_rate = int(encodec_cfg.sampling_rate)
    causal = bool(encodec_cfg.use_causal_conv)
    return {
        'compression_model': 'encodec',
        'sample_rate': sample_rate,
        'channels': 1,
        'device': 'cpu',
        'dtype': 'float32',
        'encodec': {'autoencoder': 'seanet', 'quantizer': 'rvq', 'sample_rate': sample_rate, 'channels': 1,
                    'causal': causal, 'renormalize': bool(encodec_cfg.normalize)},
        'seanet': {'dimension': int(encodec_cfg.hidden_size), 'channels': 1, 'causal': causal,
                   'n_filters': int(encodec_cfg.num_filters), 'n_residual_layers': int(encodec_cfg.num_residual_layers),
                   'ratios': [int(r) for r in encodec_cfg.upsampling_ratios], 'activation': 'ELU',
                   'activation_params': {'alpha': 1.0}, 'norm': encodec_cfg.norm_type, 'norm_params': {},
                   'kernel_size': int(encodec_cfg.kernel_size),
                   'residual_kernel_size': int(encodec_cfg.residual_kernel_size),
                   'last_kernel_size': int(encodec_cfg.last_kernel_size),
                   'dilation_base': int(encodec_cfg.dilation_growth_rate), 'pad_mode': encodec_cfg.pad_mode,
                   'true_skip': not encodec_cfg.use_conv_shortcut, 'compress': int(encodec_cfg.compress),
                   'lstm': int(encodec_cfg.num_lstm_layers), 'disable_norm_outer_blocks': 0,
                   'decoder': {'trim_right_ratio': float(encodec_cfg.trim_right_ratio), 'final_activation': None,
                               'final_activation_params': None},
                   'encoder': {}},
        'rvq': {'n_q': int(n_q), 'q_dropout': False, 'bins': int(encodec_cfg.codebook_size), 'decay': 0.99,
                'kmeans_init': True, 'kmeans_iters': 50, 'threshold_ema_dead_code': 2,
                'orthogonal_reg_weight': 0.0, 'orthogonal_reg_active_codes_only': False},
    }


def _candidates(hf_key: str) -> tp.List[str]:
    match = re.match(r'^(encoder|decoder)\.layers\.(\d+)\.(.*)$', hf_key)
    if match is None:
        return []
    part, index, rest = match.groups()
    prefix = f'{part}.model.{index}.'
    if rest.startswith('lstm.'):
        return [prefix + rest]
    # rest: [block.{b}.|shortcut.]conv.<suffix> or [..]norm.<suffix>
    inner = re.match(r'^((?:block\.\d+\.|shortcut\.)?)(conv|norm)\.(.*)$', rest)
    if inner is None or inner.group(3) not in _SUFFIXES:
        return []
    sub, kind, suffix = inner.group(1), inner.group(2), _SUFFIXES[inner.group(3)]
    if kind == 'norm':
        return [f'{prefix}{sub}conv.norm.{suffix}', f'{prefix}{sub}convtr.norm.{suffix}']
    return [f'{prefix}{sub}conv.conv.{suffix}', f'{prefix}{sub}convtr.convtr.{suffix}']


def hf_to_audiocraft_encodec(hf_state: tp.Mapping[str, torch.Tensor], target_keys: tp.Iterable[str],
                             n_q: int) -> tp.Dict[str, torch.Tensor]:
    """Rename the HF EnCodec state dict (keys without the `audio_encoder.` prefix) to AudioCraft's.

    Args:
        hf_state: `EncodecModel.state_dict()` of the HF audio encoder.
        target_keys: the keys of the AudioCraft model built from `compression_config` (used to pick conv vs convtr
            and to check that every AudioCraft weight is filled).
        n_q: quantizer layers to keep (the first `n_q`; residual quantization makes them independent of the rest).
    Raises:
        BaseModelError: naming the keys that don't map, or the AudioCraft keys left without a value.
    """
    targets = set(target_keys)
    out: tp.Dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in hf_state.items():
        quant = re.match(r'^quantizer\.layers\.(\d+)\.codebook\.(\w+)$', key)
        if quant is not None:
            if int(quant.group(1)) < n_q:
                out[f'quantizer.vq.layers.{quant.group(1)}._codebook.{quant.group(2)}'] = value
            continue
        found = [c for c in _candidates(key) if c in targets]
        if len(found) != 1:
            unmapped.append(key)
            continue
        out[found[0]] = value
    missing = sorted(targets - set(out))
    if unmapped or missing:
        raise BaseModelError(f"Can't map the HF EnCodec weights to AudioCraft's EnCodec: HF keys without a place "
                             f"{unmapped[:5]}, AudioCraft keys without a value {missing[:5]}.")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
