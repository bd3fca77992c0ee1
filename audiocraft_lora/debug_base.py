"""A tiny, deterministic MusicGen-shaped base model, written as a local AudioCraft folder.

Used by the offline demo recipe (`solver=musicgen/lora_debug`, `base_model=debug`) and by the tests. It has the
structure of a released MusicGen (EnCodec-style SEANet + RVQ compression model, delay-pattern transformer LM with
the fused q/k/v `in_proj_weight`, cross-attention on a text conditioner) at a size that trains in seconds on a CPU.
The text conditioner is a hashed lookup table (AudioCraft's `LUTConditioner` with the `noop` tokenizer) because T5
weights can't be downloaded here; everything else goes through exactly the same loading path as a real base:
`state_dict.bin` + `compression_state_dict.bin` with their own `xp.cfg`.

The weights are random but seeded, and the quantizer's codebooks are k-means initialised on encoder outputs of
synthetic music-like audio, so different audio maps to different codes.
"""
import copy
import logging
import os
from pathlib import Path
import typing as tp

import torch

logger = logging.getLogger(__name__)

DEBUG_BASE_NAME = 'debug'
DEBUG_BASE_VERSION = 1
SAMPLE_RATE = 32000

COMPRESSION_CFG: tp.Dict[str, tp.Any] = {
    'compression_model': 'encodec',
    'sample_rate': SAMPLE_RATE,
    'channels': 1,
    'device': 'cpu',
    'dtype': 'float32',
    'encodec': {'autoencoder': 'seanet', 'quantizer': 'rvq', 'sample_rate': SAMPLE_RATE, 'channels': 1,
                'causal': False, 'renormalize': False},
    'seanet': {'dimension': 32, 'channels': 1, 'causal': False, 'n_filters': 4, 'n_residual_layers': 1,
               'ratios': [16, 8, 10], 'activation': 'ELU', 'activation_params': {'alpha': 1.0},
               'norm': 'weight_norm', 'norm_params': {}, 'kernel_size': 7, 'residual_kernel_size': 3,
               'last_kernel_size': 7, 'dilation_base': 2, 'pad_mode': 'constant', 'true_skip': True,
               'compress': 2, 'lstm': 0, 'disable_norm_outer_blocks': 0,
               'decoder': {'trim_right_ratio': 1.0, 'final_activation': None, 'final_activation_params': None},
               'encoder': {}},
    'rvq': {'n_q': 4, 'q_dropout': False, 'bins': 256, 'decay': 0.99, 'kmeans_init': True, 'kmeans_iters': 20,
            'threshold_ema_dead_code': 2, 'orthogonal_reg_weight': 0.0, 'orthogonal_reg_active_codes_only': False},
}

LM_CFG: tp.Dict[str, tp.Any] = {
    'solver': 'musicgen',
    'lm_model': 'transformer_lm',
    'device': 'cpu',
    'dtype': 'float32',
    'sample_rate': SAMPLE_RATE,
    'channels': 1,
    'compression_model_n_q': None,
    'interleave_stereo_codebooks': {'use': False, 'per_timestep': False},
    'dataset': {'segment_duration': 30},
    'codebooks_pattern': {'modeling': 'delay', 'delay': {'delays': [0, 1, 2, 3], 'flatten_first': 0,
                                                         'empty_initial': 0}},
    'transformer_lm': {
        'dim': 32, 'num_heads': 2, 'num_layers': 2, 'hidden_scale': 4, 'n_q': 4, 'card': 256, 'dropout': 0.0,
        'emb_lr': None, 'activation': 'gelu', 'norm_first': True, 'bias_ff': False, 'bias_attn': False,
        'bias_proj': False, 'past_context': None, 'causal': True, 'custom': False, 'memory_efficient': True,
        'attention_as_float32': False, 'layer_scale': None, 'positional_embedding': 'sin', 'xpos': False,
        'checkpointing': 'none', 'weight_init': 'gaussian', 'depthwise_init': 'current', 'zero_bias_init': True,
        'norm': 'layer_norm', 'cross_attention': False, 'qk_layer_norm': False, 'qk_layer_norm_cross': False,
        'attention_dropout': None, 'kv_repeat': 1, 'two_step_cfg': False,
    },
    'classifier_free_guidance': {'training_dropout': 0.3, 'inference_coef': 3.0},
    'attribute_dropout': {},
    'fuser': {'cross_attention_pos_emb': False, 'cross_attention_pos_emb_scale': 1, 'sum': [], 'prepend': [],
              'cross': ['description'], 'input_interpolate': []},
    'conditioners': {'description': {'model': 'lut', 'lut': {'n_bins': 1024, 'dim': 32, 'tokenizer': 'noop'}}},
}


def default_cache_dir() -> Path:
    """Where generated artefacts (the debug base, converted bases) are cached."""
    root = os.environ.get('AUDIOCRAFT_LORA_CACHE')
    if root:
        return Path(root)
    return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'audiocraft_lora'


def _synthetic_music(num: int, seconds: float, generator: torch.Generator) -> torch.Tensor:
    """Music-like synthetic audio (tones, decaying kicks, noise hats) to fit the quantizer on. Returns [num, 1, T]."""
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = []
    for _ in range(num):
        f0 = 40 + 400 * torch.rand(1, generator=generator)
        bpm = 70 + 90 * torch.rand(1, generator=generator)
        beat = (t * bpm / 60) % 1.0
        kick = torch.sin(2 * torch.pi * f0 * t) * torch.exp(-8 * beat)
        hats = 0.2 * torch.randn(t.shape, generator=generator) * torch.exp(-30 * ((beat * 2) % 1.0))
        lead = 0.3 * torch.sin(2 * torch.pi * 4 * f0 * t + torch.sin(2 * torch.pi * 0.5 * t))
        out.append((kick + hats + lead) * 0.3)
    return torch.stack(out)[:, None]


def build_debug_packages(seed: int = 0) -> tp.Tuple[dict, dict]:
    """Build the tiny base and return AudioCraft's `(state_dict.bin, compression_state_dict.bin)` packages."""
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        compression_cfg = OmegaConf.create(copy.deepcopy(COMPRESSION_CFG))
        compression_model = builders.get_compression_model(compression_cfg)
        # k-means init of the codebooks on encoder outputs of music-like audio (first forward in train mode).
        audio = _synthetic_music(8, 2.0, generator)
        compression_model.train()
        with torch.no_grad():
            emb = compression_model.encoder(audio)
            compression_model.quantizer(emb, compression_model.frame_rate)
        compression_model.eval()

        lm_cfg = OmegaConf.create(copy.deepcopy(LM_CFG))
        lm = builders.get_lm_model(lm_cfg)
    compression_pkg = {
        'best_state': {k: v.clone() for k, v in compression_model.state_dict().items()},
        'xp.cfg': OmegaConf.to_yaml(compression_cfg),
        'version': DEBUG_BASE_VERSION,
    }
    lm_pkg = {
        'best_state': {k: v.clone() for k, v in lm.state_dict().items()},
        'xp.cfg': OmegaConf.to_yaml(lm_cfg),
        'version': DEBUG_BASE_VERSION,
    }
    return lm_pkg, compression_pkg


def write_debug_base(folder: tp.Union[str, Path], seed: int = 0) -> Path:
    """Write the tiny base as an AudioCraft folder (`state_dict.bin`, `compression_state_dict.bin`)."""
    from .checkpoint_io import atomic_torch_save
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm_pkg, compression_pkg = build_debug_packages(seed)
    atomic_torch_save(compression_pkg, folder / 'compression_state_dict.bin')
    atomic_torch_save(lm_pkg, folder / 'state_dict.bin')
    return folder


def ensure_debug_base(cache_dir: tp.Optional[Path] = None, seed: int = 0) -> Path:
    """Return the folder of the debug base, building it once (it's deterministic for a given seed)."""
    folder = Path(cache_dir or default_cache_dir()) / f'debug-base-v{DEBUG_BASE_VERSION}-seed{seed}'
    if not ((folder / 'state_dict.bin').exists() and (folder / 'compression_state_dict.bin').exists()):
        logger.info("Building the tiny debug base model in %s", folder)
        write_debug_base(folder, seed)
    return folder
