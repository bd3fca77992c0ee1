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
- `save_checkpoints` / `load_checkpoints`: atomic writes on rank 0 after a barrier, `checkpoint.keep_last` honoured,
  an unreadable checkpoint never loaded (`checkpointing`).
- `run_step` / `_compute_cross_entropy` / `train`: a non-finite loss or grad norm skips the step before
  `optimizer.step()`, counted; `nonfinite.max_consecutive` in a row raise `TrainingDivergedError` (`guards`).

Everything else is AudioCraft's: EnCodec tokenization, delay-pattern masks, CFG and attribute dropout, padding
handled with the special token and masked from the loss (`tokens.padding_with_special_token`, on by default
here), autocast, flashy's distributed helpers, logging and progress.

Raises (before any training step): `LoRAConfigError` (rank <= 0, unknown target, target matching nothing),
`BaseModelError` (base not found / not in the HF cache, checkpoint of another base), `DataError` (dataset issues).
During training: `TrainingDivergedError` (too many non-finite steps in a row), `CheckpointError` (unreadable
`checkpoint.th` with no complete epoch checkpoint to fall back on).
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
from . import checkpointing, config_checks, dropout_kernels, encoding, faults, fused_norms, gpu_peak, layer_graphs
from . import memory_plan
from .guards import NonFiniteGuard
from .data_wait import DataWait
from .diagnostics import fade_warning, sample_diagnostics, summarize_for_logging
from .errors import BaseModelError, LoRAConfigError, OutOfMemory
from .lora import AdapterParameters, LoRASettings, inject_lora
from .loss import masked_cross_entropy
from .plans import out_of_memory_advice
from .speed import (DTYPES, SpeedSettings, apply_to_model as apply_speed_settings, eager_generation, optimizer_kwargs,
                    has_fast_dropout, pin_loaders)

logger = logging.getLogger(__name__)


def _sample_kinds(cfg: omegaconf.DictConfig) -> tp.Tuple[bool, bool]:
    """(unprompted, prompted): the samples AudioCraft's generate stage is asked for (`generate.lm.*_samples`)."""
    lm = (cfg.get('generate') or {}).get('lm') or {}
    return bool(lm.get('unprompted_samples', True)), bool(lm.get('prompted_samples', True))


def _check_generate_samples(cfg: omegaconf.DictConfig) -> None:
    """AudioCraft 1.3's generate stage reads the real-time factor of the unprompted samples: continuations alone end
    the first generate epoch in `UnboundLocalError: rtf` (with neither, `generate_audio` makes nothing)."""
    unprompted, prompted = _sample_kinds(cfg)
    if prompted and not unprompted:
        raise LoRAConfigError(
            "generate.lm.prompted_samples=true needs generate.lm.unprompted_samples=true: AudioCraft's generate stage "
            "fails without unprompted samples (UnboundLocalError: rtf). Set generate.lm.unprompted_samples=true, or "
            "both to false for no samples (or generate.every to more than optim.epochs).")


OPTIMIZER_KERNEL_FLAGS = ('fused', 'foreach', 'capturable')  # how torch's Adam(W) steps, not what it learned


class LoRAMusicGenSolver(MusicGenSolver):
    """MusicGen solver that trains a LoRA adapter; see the module docstring."""

    def __init__(self, cfg: omegaconf.DictConfig):
        self.lora_settings = LoRASettings.from_config(cfg.get('lora'))
        config_checks.check_training(cfg, self.lora_settings.scaling)
        _check_generate_samples(cfg)
        self.base = base_models.resolve_base(cfg.get('base_model'))
        logger.info("Base model: %s", self.base.describe())
        self._lm_pkg = base_models.load_lm_package(self.base)
        self.base_fingerprint = base_models.fingerprint_state(self._lm_pkg['best_state'])
        base_models.check_melody_requirements(base_models.lm_config(self._lm_pkg))  # demucs, before any data work
        self._base_compression_model = base_models.load_compression_model(self.base, device=cfg.device)
        self._adopt_base_config(cfg)
        if cfg.get('validate_data', True) and cfg.get('execute_only') is None:
            self._validate_data(cfg)
        with checkpointing.model_hash_reads_16_bit():
            super().__init__(cfg)
        # a top_k of at least the codebook size keeps every token; torch.topk (AudioCraft's sampler) refuses more
        self.generation_params['top_k'] = min(int(self.generation_params['top_k']), int(cfg.transformer_lm.card))
        self.nonfinite_guard = NonFiniteGuard.from_config(cfg.get('nonfinite'))
        self.stateful.register('nonfinite', self.nonfinite_guard)  # running count of skipped steps
        self.data_wait = DataWait()  # (train epochs' `data_wait`: the share of time spent waiting for batches)

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
        only = cfg.get('validate_splits')  # (valid_ce: the valid split alone, whatever train is)
        splits = {k: v for k, v in cfg.datasource.items() if isinstance(v, str) and (not only or k in only)}
        report = validate_datasource(
            splits, sample_rate=cfg.sample_rate, channels=cfg.channels,
            segment_duration=cfg.dataset.segment_duration, min_segment_ratio=cfg.dataset.min_segment_ratio,
            base_dir=git_save.to_absolute_path('.'),  # relative manifest paths: where `dora run` was launched
            allow_silence=bool(cfg.get('allow_silence', False)))
        logger.info("%s", report.summary_table())
        report.raise_if_errors()

    # ---------------------------------------------------------------- model
    def build_dataloaders(self) -> None:
        """AudioCraft's loaders, page-locked per lora.pin_memory. Runs first in AudioCraft's __init__, so the speed
        settings are read (and checked) here, once, for build_model and the optimizer too."""
        self.speed_settings = SpeedSettings.from_config(self.cfg.get('lora'))
        super().build_dataloaders()
        pinned = pin_loaders(self.dataloaders, self.speed_settings, self.device)
        if pinned:
            self.logger.info("Page-locked batches (lora.pin_memory) for the %s loaders", ', '.join(pinned))

    def build_model(self) -> None:
        """Base compression model + LM from the base checkpoint, LoRA injected, adapter-only optimization."""
        self.compression_model = get_wrapped_compression_model(self._base_compression_model, self.cfg)
        # (lora.encode_chunk=auto: 4 items at a time until the memory plan takes more, encoding.plan)
        encoding.chunk_encoder(self.compression_model, encoding.initial_chunk(self.speed_settings.encode_chunk))
        lm = base_models.build_lm(self._lm_pkg, device='cpu', overrides=self.cfg.get('base_overrides'))
        self._lm_pkg = {}  # base weights live in the model now; keep no second copy
        self.lora_targets = inject_lora(lm, self.lora_settings, fast_path=self.speed_settings.fast_path)
        speed_info = apply_speed_settings(lm, self.speed_settings, autocast=bool(self.cfg.autocast),
                                          autocast_dtype=DTYPES[self.cfg.autocast_dtype])
        logger.info("LoRA speed settings: fast_path=%s %s", self.speed_settings.fast_path, speed_info)
        self.model = lm.to(self.device)
        if speed_info.get('fused_norms') and torch.device(self.device).type == 'cuda':
            # (the Triton kernels checked against ATen now, not at their first use inside a CUDA graph's warmup)
            logger.info("Fused layer norms (lora.fused_norms), Triton kernels usable: %s",
                        fused_norms.check_kernels(self.model))
        kernels = dropout_kernels.check(self.model, self.device,
                                        required=str(self.speed_settings.dropout_kernel).lower() == 'true')
        if kernels is not None:
            logger.info("LoRA dropout inside the rank-r products (lora.dropout_kernel): %s",
                        'Triton kernels' if kernels else "no, torch's dropout")
        self.memory_estimate = memory_plan.plan_training(self)  # may switch the LM's checkpointing (auto)
        self.graph_shapes = memory_plan.plan_graphs(self)  # CUDA graphs of the layers (lora.graph_layers)
        planned = self.speed_settings
        if planned.cuda_graphs and planned.activation_checkpointing != 'none' and self.device != 'cpu':
            logger.warning("lora.compile_mode=%s with activation checkpointing (%s) is not checked on a GPU yet; "
                           "torch reports CUDA graph trees failing on checkpointed graphs (pytorch/pytorch#154306). "
                           "If the first step fails, use lora.compile_mode=default, or a batch that fits without "
                           "checkpointing.", planned.compile_mode, planned.activation_checkpointing)
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
        self._check_schedule()
        self.lr_scheduler = builders.get_lr_scheduler(self.optimizer, self.cfg.schedule, self.total_updates)
        self.register_stateful('optimizer', 'lr_scheduler')
        self.stateful.register('base', checkpointing.BaseFingerprint(self.base.name, self.base_fingerprint))
        self.stateful.register('rng', checkpointing.RandomState(self.model))
        self.best_state.dtype = None  # keep the best adapter in float32, it's small
        self.register_best_state('model')
        self.autocast_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}[self.cfg.autocast_dtype]
        self.scaler: tp.Optional[torch.cuda.amp.GradScaler] = None
        if self.cfg.autocast and self.autocast_dtype is torch.float16:
            self.scaler = torch.amp.GradScaler('cuda')
            self.register_stateful('scaler')

    def _check_schedule(self) -> None:
        """A warmup as long as training divides by zero at the last step of AudioCraft's cosine/polynomial
        schedules: refused. A longer warmup never reaches `optim.lr`: warned."""
        name = self.cfg.schedule.get('lr_scheduler')
        warmup = (self.cfg.schedule.get(name) or {}).get('warmup') if name else None
        if name not in ('cosine', 'polynomial_decay') or warmup is None or warmup < self.total_updates:
            return
        message = (f"schedule.{name}.warmup={warmup} but training has {self.total_updates} updates "
                   f"(optim.epochs={self.cfg.optim.epochs} x {self.total_updates // max(1, self.cfg.optim.epochs)} "
                   f"per epoch)")
        fix = f"lower the warmup (e.g. schedule.{name}.warmup={max(1, self.total_updates // 10)}) or train longer"
        if warmup == self.total_updates:
            raise LoRAConfigError(f"{message}: AudioCraft's schedule would divide by zero at the last step; {fix}.")
        logger.warning("%s: the learning rate never reaches optim.lr=%s; %s.", message, self.cfg.optim.lr, fix)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        from audiocraft.solvers import builders
        params = list(self.adapter.parameters())
        optim_cfg = self.cfg.optim
        extra = optimizer_kwargs(getattr(self, 'speed_settings', SpeedSettings()), params, optim_cfg.optimizer)
        if extra:  # fused/foreach Adam(W) kernels: AudioCraft passes `optim.adam` through to torch
            optim_cfg = OmegaConf.create(OmegaConf.to_container(optim_cfg, resolve=True))
            optim_cfg.adam.update(extra)
        return builders.get_optimizer(params, optim_cfg)

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

    def save_checkpoints(self) -> None:
        """Atomic writes on rank 0 after a barrier, `checkpoint.keep_last` honoured (`checkpointing`)."""
        checkpointing.save_checkpoints(self)

    def load_checkpoints(self, load_best: bool = False, ignore_state_keys: tp.List[str] = []) -> tp.Optional[dict]:
        """AudioCraft's, but an unreadable `checkpoint.th` is never loaded (`checkpointing.prepare_latest`)."""
        checkpointing.prepare_latest(self)
        state = super().load_checkpoints(load_best, ignore_state_keys)
        checkpointing.after_load(self, state)
        return state

    # ---------------------------------------------------------------- non-finite guard
    def run_step(self, idx: int, batch: tp.Any, metrics: dict) -> dict:
        """AudioCraft's step; in training, a non-finite loss or grad norm skips the step before optimizer.step()."""
        if self.speed_settings.cuda_graphs:  # a new iteration: the last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if not self.is_training:
            return super().run_step(idx, batch, metrics)
        faults.kill_point('train_step', epoch=self.epoch, step=idx, rank=flashy.distrib.rank())
        self.data_wait.step_begins()
        try:
            faults.maybe_out_of_memory(epoch=self.epoch, step=idx, rank=flashy.distrib.rank())
            metrics = self.nonfinite_guard.run_step(
                self, lambda: super(LoRAMusicGenSolver, self).run_step(idx, batch, metrics), metrics, self.epoch, idx)
            self.data_wait.step_ends(self.device)
            return metrics
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(out_of_memory_advice(
                self.speed_settings, int(self.cfg.dataset.batch_size) * flashy.distrib.world_size(),  # per rank here
                float(self.cfg.dataset.segment_duration), str(exc),
                lora_dropout=has_fast_dropout(self.model),
                graphs=layer_graphs.installed(self.model) is not None)) from None

    def _compute_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor,
                               mask: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.List[torch.Tensor]]:
        """AudioCraft's masked cross-entropy, without its per-codebook slices and boolean gathers (loss.py: the same
        values); in training the loss is also handed to the non-finite guard."""
        ce, ce_per_codebook = masked_cross_entropy(logits, targets, mask)
        if self.is_training:
            ce = faults.maybe_poison_loss(ce, epoch=self.epoch, step=self.nonfinite_guard.step_idx,
                                          rank=flashy.distrib.rank())
            self.nonfinite_guard.observe_loss(ce)
        return ce, ce_per_codebook

    def train(self) -> dict:
        """AudioCraft's train stage, plus `skipped_steps` (this epoch), `skipped_steps_total`, `data_wait` (the
        share of the epoch's step time spent waiting for batches; a warning above data_wait.WARN_SHARE) and on CUDA
        `gpu_peak_gib` (gpu_peak.py)."""
        self.nonfinite_guard.start_epoch()
        self.data_wait.start_epoch()
        gpu_peak.start_epoch(self.device)
        metrics = self.data_wait.epoch_metrics(
            self.nonfinite_guard.epoch_metrics(super().train()), int(self.cfg.dataset.num_workers), self.epoch,
            self.logger, cached=getattr(self, '_cached_batch_loader', None) is not None)
        peak = gpu_peak.epoch_peak(self.device)
        if peak is not None:  # (CUDA: `gpu_peak_gib`, and the first epoch's against the plan)
            metrics['gpu_peak_gib'] = peak[0] / gpu_peak.GIB
            if self.epoch == 1:
                self.logger.info(gpu_peak.describe(*peak, getattr(self, 'memory_estimate', None)))
        graphs = layer_graphs.installed(self.model)
        if graphs is not None:
            self.logger.info("CUDA graphs (lora.graph_layers): %s", graphs.summary())
        return metrics

    # ---------------------------------------------------------------- export
    def export_adapter(self, folder: tp.Optional[tp.Union[str, Path]] = None,
                       use_best: tp.Optional[bool] = None) -> Path:
        """Write the best-valid (or, `export_state: last`, the last) adapter to `folder` (default `<xp>/adapter`);
        its config names the epoch it is from."""
        folder = Path(folder) if folder is not None else self.folder / 'adapter'
        if use_best is None:
            use_best = checkpointing.export_state(self.cfg) == 'best'
        has_best = 'model' in self.best_state.states and bool(self.best_state.states['model'])
        chosen = checkpointing.exported_epoch(self.history, self.best_metric_name, use_best and has_best)
        best = use_best and has_best and checkpointing.best_state_kept(self.history, self.best_metric_name)
        state = self.best_state.states['model'] if best else self.adapter.state_dict()
        adapters.save_adapter(
            folder, state, self.lora_settings, self.lora_targets, base_model=self.base.name,
            base_fingerprint=self.base_fingerprint, base_kind=self.base.kind,
            extra={'xp_sig': self.xp.sig, 'sample_rate': int(self.cfg.sample_rate), **chosen})
        self.logger.info("Adapter exported to %s: epoch %s of %s (%s).", folder, *chosen.values())
        return folder

    # ---------------------------------------------------------------- diagnostics of generated samples
    def run_generate_step(self, batch, gen_duration: float, prompt_duration: tp.Optional[float] = None,
                          remove_prompt: bool = False, **generation_params) -> dict:
        """AudioCraft's generate step (eager even with `lora.compile`); its audio is also measured (fade, silence,
        noise-likeness, clipping)."""
        with eager_generation(self.speed_settings):
            outputs = super().run_generate_step(batch, gen_duration, prompt_duration, remove_prompt,
                                                **generation_params)
        kind = 'unprompted' if outputs['prompt_audio'] is None else 'continuation'
        diags = sample_diagnostics(outputs['gen_audio'], int(self.cfg.sample_rate),
                                   window_s=self._diagnostics_cfg('window_s'))
        self._generated_diagnostics.setdefault(kind, []).extend(diags)
        return outputs

    def generate_audio(self) -> dict:
        """AudioCraft's generate stage, plus the diagnostics of its samples as metrics (history, tensorboard,
        wandb): `gen_*` for unprompted samples, `gen_cont_*` for continuations; a warning names the epoch when
        the samples fade (see `diagnostics.fade_warning`)."""
        self._generated_diagnostics: tp.Dict[str, list] = {}
        if not any(_sample_kinds(self.cfg)):
            self.logger.info("No samples to generate (generate.lm.unprompted_samples and prompted_samples are false).")
            return {}
        metrics = super().generate_audio()
        for kind, prefix in (('unprompted', 'gen_'), ('continuation', 'gen_cont_')):
            diags = self._generated_diagnostics.get(kind)
            if diags:
                local = summarize_for_logging(diags, prefix=prefix)
                count = local.pop(f'{prefix}count')
                metrics.update(flashy.distrib.average_metrics(local, count))
                metrics[f'{prefix}count'] = count * flashy.distrib.world_size()
                warning = fade_warning(metrics, self.epoch, self._diagnostics_cfg('fade_warning_db'), prefix=prefix)
                if warning is not None:
                    self.logger.warning("%s samples: %s", kind, warning)
        return metrics

    def _diagnostics_cfg(self, key: str) -> float:
        return float(self.cfg.diagnostics[key])  # solver/musicgen/lora_default.yaml

    def commit(self, save_checkpoints: bool = True) -> None:
        """AudioCraft's end of epoch (history, checkpoints), then the curves so far as PNGs in the XP folder."""
        super().commit(save_checkpoints)
        if flashy.distrib.is_rank_zero():
            self.write_curves()

    def write_curves(self) -> tp.List[Path]:
        """`loss_curves.png` (train/valid CE per epoch, the epoch the adapter is exported from marked) and
        `sample_fade.png` (fade ratio of the generated samples per epoch, "no samples yet" before the first generate
        stage). Never fails the run."""
        from . import plots
        from .errors import UserError
        chosen = checkpointing.exported_epoch(self.history, self.best_metric_name,
                                              checkpointing.export_state(self.cfg) == 'best')
        figures = {'loss_curves.png': lambda path: plots.plot_loss_curves(
                       self.history, path, metric='ce', stages=('train', 'valid'), title='cross-entropy per epoch',
                       mark_epoch=chosen['epoch'], mark_label=f"exported adapter: {chosen['selected_by']}"),
                   'sample_fade.png': lambda path: plots.plot_sample_fade(
                       self.history, path, warning_db=float(self._diagnostics_cfg('fade_warning_db')))}
        written = []
        for name, draw in figures.items():
            try:
                written.append(draw(self.folder / name))
            except UserError:  # nothing to draw yet
                continue
            except Exception as exc:  # a figure must never stop training
                self.logger.warning("Could not draw %s: %s", name, exc)
        return written

    def should_stop_training(self) -> bool:
        """AudioCraft's rule, plus `stop_at_epoch` (not part of the XP signature) to stop early and resume later."""
        stop_at = self.cfg.get('stop_at_epoch')
        return super().should_stop_training() or (stop_at is not None and self.epoch > stop_at)

    def load_state_dict(self, state: dict) -> None:
        """flashy's; the optimizer keeps the kernel this run chose (`lora.fused_optimizer`, a speed key that may
        change between resumes), not the checkpoint's: torch's Optimizer.load_state_dict takes every param-group
        field from the checkpoint, `fused`/`foreach` included."""
        optimizer = getattr(self, 'optimizer', None)
        kernels = [{key: group[key] for key in OPTIMIZER_KERNEL_FLAGS if key in group}
                   for group in optimizer.param_groups] if optimizer is not None else []
        checkpointing.check_restorable(state, self.stateful.sources['base'], self.adapter)
        super().load_state_dict(state)
        for group, flags in zip(optimizer.param_groups if optimizer is not None else [], kernels):
            group.update(flags)

    def restore(self, load_best: bool = False, replay_metrics: bool = False,
                ignore_state_keys: tp.List[str] = []) -> bool:
        """AudioCraft's (which logs the model hash); a continue_from that names nothing is a UserError."""
        with checkpointing.model_hash_reads_16_bit(), checkpointing.continue_from_named(self.cfg.continue_from):
            return super().restore(load_best, replay_metrics, ignore_state_keys)

    def run(self):
        super().run()
        if flashy.distrib.is_rank_zero():
            self.export_adapter()
