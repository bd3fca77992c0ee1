"""Resuming from a checkpoint that can't fit this run says why before any tensor is loaded."""
import pytest
import torch
from torch import nn

from audiocraft_lora import checkpointing
from audiocraft_lora.errors import BaseModelError, UserError


class _Adapter(nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, 16))


def _state(rank: int, fingerprint: str = 'a' * 64, best: bool = True) -> dict:
    state = {'model': _Adapter(rank).state_dict(), 'base': {'base_model': 'debug', 'fingerprint': fingerprint}}
    if best:
        state['best_state'] = {'model': _Adapter(rank).state_dict()}
    return state


def test_checkpoints_of_other_shapes_or_bases_are_refused_with_the_fix():
    base = checkpointing.BaseFingerprint('debug', 'a' * 64)
    checkpointing.check_restorable(_state(8), base, _Adapter(8))  # (its own: fine)
    with pytest.raises(UserError, match=r"model lora_A is \(4, 16\), this run's is \(8, 16\).*lora.rank"):
        checkpointing.check_restorable(_state(4), base, _Adapter(8))
    with pytest.raises(UserError, match=r"best_state lora_A is \(4, 16\)"):
        state = _state(8)
        state['best_state'] = {'model': _Adapter(4).state_dict()}
        checkpointing.check_restorable(state, base, _Adapter(8))
    # another base (its dimensions too): the fingerprint's message comes first, naming both bases
    with pytest.raises(BaseModelError, match=r"trained on base 'debug' \(fingerprint bbbbbbbbbbbb\)"):
        checkpointing.check_restorable(_state(4, fingerprint='b' * 64), base, _Adapter(8))


def test_a_continue_from_that_names_nothing_says_what_it_takes():
    with pytest.raises(UserError, match=r"continue_from=/nowhere/ck.th: no checkpoint there. Give `//sig/<sig>`"):
        with checkpointing.continue_from_named('/nowhere/ck.th'):
            raise RuntimeError('Could not resolve continue_from checkpoint /nowhere/ck.th')
    with pytest.raises(RuntimeError, match='something else'):  # other errors pass through
        with checkpointing.continue_from_named('x'):
            raise RuntimeError('something else')


def test_schedules_and_rates_that_cant_train_are_refused_before_the_base_loads(caplog):
    """config_checks: epochs >= 1, a bounded epoch, and no learning rate or LoRA scaling that can only diverge."""
    import logging
    from omegaconf import OmegaConf
    from audiocraft_lora.config_checks import check_training
    from audiocraft_lora.errors import LoRAConfigError

    def cfg(**optim):
        base = {'epochs': 10, 'updates_per_epoch': 100, 'lr': 1e-4}
        return OmegaConf.create({'optim': {**base, **optim}, 'execute_only': None,
                                 'dataset': {'batch_size': 4, 'train': {'num_samples': 1000000}}})

    check_training(cfg(), 2.0)
    for bad, message in (({'epochs': 0}, r'optim.epochs=0: train at least one epoch'),
                         ({'updates_per_epoch': 0}, r'updates_per_epoch=0.*\(1000000\) / dataset.batch_size \(4\) '
                                                    r'= 250000 steps'),
                         ({'updates_per_epoch': None}, r'updates_per_epoch=None'),
                         ({'lr': 1.0}, r'optim.lr=1, lora.alpha / lora.rank = 2.*would blow up')):
        with pytest.raises(LoRAConfigError, match=message):
            check_training(cfg(**bad), 2.0)
    with pytest.raises(LoRAConfigError, match=r'lora.alpha / lora.rank = 1e\+08'):
        check_training(cfg(), 1e8)
    small = cfg(updates_per_epoch=None)
    small.dataset.train.num_samples = 400  # (a dataset sized to its clips: 100 steps an epoch is fine)
    with caplog.at_level(logging.WARNING, logger='audiocraft_lora.config_checks'):
        check_training(small, 2.0)
        assert not caplog.records
        check_training(cfg(lr=3e-4), 16.0)  # high but possible: warned, naming the recipes' values
    assert 'optim.lr=0.0003 is high' in caplog.text and 'lora.alpha / lora.rank = 16 is high' in caplog.text
    caplog.clear()
    debug = cfg(lr=1e-3)
    debug.base_model = 'debug'  # (lora_debug's tiny random base: its own rate, not warned)
    with caplog.at_level(logging.WARNING, logger='audiocraft_lora.config_checks'):
        check_training(debug, 2.0)
    assert not caplog.records
    finished = cfg(epochs=0)
    finished.execute_only = 'export'
    check_training(finished, 2.0)  # (execute_only trains nothing: not checked)


def test_a_cuda_device_without_a_gpu_says_how_to_run_on_the_cpu(monkeypatch):
    from audiocraft_lora.config_checks import check_device
    from audiocraft_lora.errors import LoRAConfigError
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    check_device('cpu')
    with pytest.raises(LoRAConfigError, match=r'device=cuda, but torch sees no CUDA GPU.*device=cpu'):
        check_device('cuda')
    with pytest.raises(LoRAConfigError, match=r'--device=cuda:1, .*--device=cpu'):
        check_device('cuda:1', option='--device')
