"""LoRAMusicGenSolver: AudioCraft's MusicGenSolver, training a LoRA adapter on a frozen base.

Only the hooks that must change are overridden:

- `__init__`: resolve the base (hub id | local AudioCraft folder | local HF folder | `debug`) and take its
  architecture (`transformer_lm`, codebook pattern, conditioners, CFG/attribute dropout...) and sample rate /
  channels from the base checkpoint itself; validate LoRA settings and the dataset before anything expensive.
- `build_model`: base compression model + LM from the base's own config and weights, then LoRA (peft) injected,
  base frozen. The stateful 'model', the EMA, the best state and the optimizer see the adapter only
  (`lora.AdapterParameters`); DDP's eager sync all-reduces only parameters that require grad.
- `state_dict` / `load_state_dict`: checkpoints are plain containers (load with `torch.load(weights_only=True)`),
  hold the adapter and training state plus the base fingerprint, and never a base weight.
- `run`: AudioCraft's loop, then the best adapter is exported to `<xp folder>/adapter`.

Everything else is AudioCraft's: EnCodec tokenization, delay-pattern masks, CFG and attribute dropout, padding
handled with the special token and masked from the loss (`tokens.padding_with_special_token`, on by default
here), autocast, flashy's distributed helpers, logging and progress.

Raises (before any training step): `LoRAConfigError` (rank <= 0, unknown target, target matching nothing),
`BaseModelError` (base not found / not in the HF cache, checkpoint of another base), `DataError` (dataset issues).
"""
import logging
from pathlib import Path
import typing as tp

import flashy
import omegaconf
from omegaconf import OmegaConf
import torch

from audiocraft.models.builders import get_wrapped_compression_model
from audiocraft.solvers.musicgen import MusicGenSolver

from . import adapters, base_models
from .errors import BaseModelError
from .lora import AdapterParameters, LoRASettings, inject_lora

logger = logging.getLogger(__name__)


class _BaseFingerprint:
    """State source holding the base fingerprint: a checkpoint of another base is refused on restore."""

    def __init__(self, name: str, fingerprint: str):
        self.name = name
        self.fingerprint = fingerprint

    def state_dict(self) -> dict:
        return {'base_model': self.name, 'fingerprint': self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state and state.get('fingerprint') != self.fingerprint:
            raise BaseModelError(
                f"This checkpoint was trained on base {state.get('base_model')!r} (fingerprint "
                f"{str(state.get('fingerprint'))[:12]}) but the current base is {self.name!r} (fingerprint "
                f"{self.fingerprint[:12]}). Use the same base_model, or start a new XP.")


class _RandomState:
    """State source for every RNG that training consumes, so that a resumed XP continues exactly.

    Covers torch (CPU and CUDA: LoRA dropout, sampler order), Python's `random` (text merge/drop in MusicDataset,
    T5 word dropout), numpy, and the private generators of AudioCraft's CFG and attribute dropout modules.
    Stored as tensors/lists only, so the checkpoint stays loadable with `weights_only=True`.
    """

    def __init__(self, model: torch.nn.Module):
        self.generators = {name: getattr(model, name).rng for name in ('cfg_dropout', 'att_dropout')
                           if hasattr(getattr(model, name, None), 'rng')}

    def state_dict(self) -> dict:
        import random
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            'torch': torch.get_rng_state(),
            'python': random.getstate(),
            'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype('int64')), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
            'generators': {name: gen.get_state() for name, gen in self.generators.items()},
        }
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import random
        import numpy as np
        if not state:
            return
        torch.set_rng_state(state['torch'])
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
        npst = state['numpy']
        np.random.set_state((npst['kind'], npst['keys'].numpy().astype('uint32'), npst['pos'], npst['has_gauss'],
                             npst['cached_gaussian']))
        for name, gen_state in state.get('generators', {}).items():
            if name in self.generators:
                self.generators[name].set_state(gen_state)
        if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])


class LoRAMusicGenSolver(MusicGenSolver):
    """MusicGen solver that trains a LoRA adapter; see the module docstring."""

    def __init__(self, cfg: omegaconf.DictConfig):
        self.lora_settings = LoRASettings.from_config(cfg.get('lora'))
        self.base = base_models.resolve_base(cfg.get('base_model'))
        logger.info("Base model: %s", self.base.describe())
        self._lm_pkg = base_models.load_lm_package(self.base)
        self.base_fingerprint = base_models.fingerprint_state(self._lm_pkg['best_state'])
        self._base_compression_model = base_models.load_compression_model(self.base, device=cfg.device)
        self._adopt_base_config(cfg)
        if cfg.get('validate_data', True) and cfg.get('execute_only') is None:
            self._validate_data(cfg)
        super().__init__(cfg)

    # ---------------------------------------------------------------- configuration from the base checkpoint
    def _adopt_base_config(self, cfg: omegaconf.DictConfig) -> None:
        """Copy the base's architecture and audio format into `cfg` (never re-declared in yaml)."""
        base_cfg = base_models.lm_config(self._lm_pkg)
        OmegaConf.set_struct(cfg, False)
        for key in base_models.ARCHITECTURE_KEYS:
            if key in base_cfg:
                cfg[key] = base_cfg[key]
        overrides = cfg.get('base_overrides') or {}
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=True)
        compression = self._base_compression_model
        sample_rate, channels = int(compression.sample_rate), int(compression.channels)
        if cfg.get('interleave_stereo_codebooks') and cfg.interleave_stereo_codebooks.use:
            channels = 2
        for key, value in (('sample_rate', sample_rate), ('channels', channels)):
            if cfg.get(key) not in (None, value):
                logger.warning("Config %s=%s differs from the base's %s: using the base's.", key, cfg.get(key), value)
            cfg[key] = value
        OmegaConf.set_struct(cfg, True)
        import dora
        xp_cfg = dora.get_xp().cfg  # AudioCraft's SampleManager reads the XP's copy of the config
        if xp_cfg is not cfg:
            with omegaconf.open_dict(xp_cfg):
                xp_cfg.sample_rate, xp_cfg.channels = sample_rate, channels

    def _validate_data(self, cfg: omegaconf.DictConfig) -> None:
        try:
            from .data.validate import validate_datasource
        except ImportError:  # pragma: no cover - data package not installed
            logger.warning("Dataset validation is not available in this version; skipping it.")
            return
        from dora import git_save
        splits = {k: v for k, v in cfg.datasource.items() if isinstance(v, str)}
        report = validate_datasource(
            splits, sample_rate=cfg.sample_rate, channels=cfg.channels,
            segment_duration=cfg.dataset.segment_duration, min_segment_ratio=cfg.dataset.min_segment_ratio,
            base_dir=git_save.to_absolute_path('.'))  # relative manifest paths: where `dora run` was launched
        logger.info("Dataset check:\n%s", report.summary_table())
        report.raise_if_errors()

    # ---------------------------------------------------------------- model
    def build_model(self) -> None:
        """Base compression model + LM from the base checkpoint, LoRA injected, adapter-only optimization."""
        self.compression_model = get_wrapped_compression_model(self._base_compression_model, self.cfg)
        lm = base_models.build_lm(self._lm_pkg, device='cpu')
        self._lm_pkg = {}  # base weights live in the model now; keep no second copy
        self.lora_targets = inject_lora(lm, self.lora_settings)
        self.model = lm.to(self.device)
        assert self.cfg.transformer_lm.card == self.compression_model.cardinality
        assert self.cfg.transformer_lm.n_q == self.compression_model.num_codebooks
        if self.cfg.fsdp.use:
            raise BaseModelError("fsdp.use=true is not supported with LoRA: the frozen base is not sharded and "
                                 "the adapter is tiny. Use DDP (`dora run -d`) instead, with fsdp.use=false.")
        self.adapter = AdapterParameters(self.model)
        logger.info("LoRA targets %s: %.3fM trainable parameters (rank %d, alpha %s).", self.lora_targets,
                    self.adapter.num_parameters() / 1e6, self.lora_settings.rank, self.lora_settings.alpha)
        # 'model' in the checkpoint, best state and EMA means the adapter, never the frozen base.
        self.stateful.register('model', self.adapter)
        self._ema_sources['model'] = self.adapter
        self.optimizer = self._build_optimizer()
        from audiocraft.solvers import builders
        self.lr_scheduler = builders.get_lr_scheduler(self.optimizer, self.cfg.schedule, self.total_updates)
        self.register_stateful('optimizer', 'lr_scheduler')
        self.stateful.register('base', _BaseFingerprint(self.base.name, self.base_fingerprint))
        self.stateful.register('rng', _RandomState(self.model))
        self.best_state.dtype = None  # keep the best adapter in float32, it's small
        self.register_best_state('model')
        self.autocast_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}[self.cfg.autocast_dtype]
        self.scaler: tp.Optional[torch.cuda.amp.GradScaler] = None
        if self.cfg.autocast and self.autocast_dtype is torch.float16:
            self.scaler = torch.amp.GradScaler('cuda')
            self.register_stateful('scaler')

    def _build_optimizer(self) -> torch.optim.Optimizer:
        from audiocraft.solvers import builders
        params = list(self.adapter.parameters())
        return builders.get_optimizer(params, self.cfg.optim)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Checkpoint content as plain containers, so it loads with `torch.load(weights_only=True)`."""
        state = super().state_dict()
        if 'xp.cfg' in state and isinstance(state['xp.cfg'], omegaconf.DictConfig):
            state['xp.cfg'] = OmegaConf.to_container(state['xp.cfg'], resolve=False)
        if isinstance(state.get('ema'), dict):
            ema = state['ema']
            state['ema'] = {'state': {k: dict(v) for k, v in ema['state'].items()}, 'count': ema['count']}
        return state

    # ---------------------------------------------------------------- export
    def export_adapter(self, folder: tp.Optional[tp.Union[str, Path]] = None, use_best: bool = True) -> Path:
        """Write the (best) adapter to `folder` (default `<xp folder>/adapter`)."""
        folder = Path(folder) if folder is not None else self.folder / 'adapter'
        if use_best and 'model' in self.best_state.states and self.best_state.states['model']:
            state = self.best_state.states['model']
        else:
            state = self.adapter.state_dict()
        adapters.save_adapter(
            folder, state, self.lora_settings, self.lora_targets, base_model=self.base.name,
            base_fingerprint=self.base_fingerprint, base_kind=self.base.kind,
            extra={'xp_sig': self.xp.sig, 'epoch': self.epoch - 1, 'sample_rate': int(self.cfg.sample_rate)})
        return folder

    def should_stop_training(self) -> bool:
        """AudioCraft's rule, plus `stop_at_epoch` (not part of the XP signature) to stop early and resume later."""
        stop_at = self.cfg.get('stop_at_epoch')
        return super().should_stop_training() or (stop_at is not None and self.epoch > stop_at)

    def run(self):
        super().run()
        if flashy.distrib.is_rank_zero():
            folder = self.export_adapter()
            self.logger.info("Adapter exported to %s", folder)
