"""Training settings that can't mean what the user wants, refused (or, when merely unusual, warned about) before the
base model is loaded: the schedule (an epoch of AudioCraft's default one million samples, zero epochs), and learning
rates and LoRA scalings far outside what fine-tunes MusicGen (the user's story: too high a rate turned it to noise).
"""
import logging
import typing as tp

from .errors import LoRAConfigError

logger = logging.getLogger(__name__)

MAX_STEPS_PER_EPOCH = 10_000  # an epoch longer than this without updates_per_epoch is AudioCraft's sampler default
LR_WARN, LR_REFUSE = 2e-4, 0.1  # the recipes train at 1e-4; 3e-4 is the rate that turned the first users' model
# to noise (lora_debug's tiny random base trains at 1e-3: not warned)
SCALING_WARN, SCALING_REFUSE = 8.0, 1000.0  # lora.alpha / lora.rank: the recipes use 2


def check_schedule(cfg) -> None:
    """optim.epochs >= 1 and a bounded epoch (AudioCraft reads updates_per_epoch 0/None as the whole
    dataset.train.num_samples, which for a sampling dataset is its default of one million)."""
    epochs = cfg.optim.get('epochs')
    if not isinstance(epochs, int) or epochs < 1:
        raise LoRAConfigError(f"optim.epochs={epochs!r}: train at least one epoch (the recipes: 10); an XP with "
                              "none would export an untrained adapter.")
    updates = cfg.optim.get('updates_per_epoch')
    if updates is None or updates <= 0:
        samples = int(cfg.dataset.get('train', {}).get('num_samples') or cfg.dataset.get('num_samples') or 0)
        steps = samples // max(1, int(cfg.dataset.batch_size))
        if steps > MAX_STEPS_PER_EPOCH:
            raise LoRAConfigError(
                f"optim.updates_per_epoch={updates!r}: AudioCraft then makes an epoch dataset.train.num_samples "
                f"({samples}) / dataset.batch_size ({cfg.dataset.batch_size}) = {steps} steps, with no progress or "
                "checkpoint until it ends. Set a positive number of steps per epoch (the recipes: 100-200).")


def check_rates(cfg, scaling: float) -> None:
    """Refuse learning rates and LoRA scalings that can only diverge; warn where they are merely high."""
    lr = float(cfg.optim.lr)
    if lr >= LR_REFUSE or scaling >= SCALING_REFUSE:
        raise LoRAConfigError(
            f"optim.lr={lr:g}, lora.alpha / lora.rank = {scaling:g}: the adapter's updates would blow up the LM "
            f"(refused at lr >= {LR_REFUSE:g} or a scaling >= {SCALING_REFUSE:g}). The recipes: lr 1e-4, alpha = "
            "2 x rank.")
    if lr > LR_WARN and cfg.get('base_model') != 'debug':
        logger.warning("optim.lr=%g is high for LoRA on MusicGen (the recipes: 1e-4; 3e-4 is what turned the first "
                       "users' fine-tune to noise). Watch valid CE and the samples' noise flags.", lr)
    if scaling > SCALING_WARN:
        logger.warning("lora.alpha / lora.rank = %g is high (the recipes: 2): the same learning rate moves the "
                       "model %gx as far as there.", scaling, scaling / 2)


def check_device(device: tp.Optional[str], option: str = 'device') -> None:
    """A CUDA device where torch sees none: say how to run on the CPU instead of torch's "no NVIDIA driver"."""
    import torch
    if device is not None and str(device).startswith('cuda') and not torch.cuda.is_available():
        raise LoRAConfigError(f"{option}={device}, but torch sees no CUDA GPU here (torch.cuda.is_available() is "
                              f"False). Run on the CPU with {option}=cpu (slow: for trying things out), or check "
                              "the driver, CUDA_VISIBLE_DEVICES and that torch was installed with CUDA.")


def check_training(cfg, scaling: float) -> None:
    """The device; the schedule and rates when the run trains (not execute_only: export, evaluate, generate)."""
    check_device(cfg.get('device'))
    if cfg.get('execute_only') is None:
        check_schedule(cfg)
        check_rates(cfg, scaling)


__all__: tp.List[str] = ['check_device', 'check_schedule', 'check_rates', 'check_training']
