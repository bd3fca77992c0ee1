"""The solver's loss_curves.png marks the epoch its adapter is exported from (best valid CE, or the last)."""
import logging
import types

from omegaconf import OmegaConf

from audiocraft_lora import plots
from audiocraft_lora.solver import LoRAMusicGenSolver


def _solver(tmp_path, history, export_state='best'):
    return types.SimpleNamespace(history=history, best_metric_name='ce', folder=tmp_path,
                                 cfg=OmegaConf.create({'export_state': export_state}),
                                 logger=logging.getLogger('test_curves_mark'),
                                 _diagnostics_cfg=lambda key: -10.0)


def test_the_loss_curves_mark_the_exported_epoch(tmp_path, monkeypatch):
    drawn = {}
    real = plots.plot_loss_curves

    def spy(history, path, **kwargs):
        drawn.update(kwargs)
        return real(history, path, **kwargs)
    monkeypatch.setattr(plots, 'plot_loss_curves', spy)
    history = [{'train': {'ce': 5.0}, 'valid': {'ce': 4.0}}, {'train': {'ce': 4.0}, 'valid': {'ce': 3.5}},
               {'train': {'ce': 3.0}, 'valid': {'ce': 3.9}}]
    written = LoRAMusicGenSolver.write_curves(_solver(tmp_path, history))
    assert tmp_path / 'loss_curves.png' in written and (tmp_path / 'loss_curves.png').stat().st_size > 0
    assert drawn['mark_epoch'] == 2 and drawn['mark_label'] == 'exported adapter: lowest valid ce (3.5000)'
    LoRAMusicGenSolver.write_curves(_solver(tmp_path, history, export_state='last'))
    assert drawn['mark_epoch'] == 3 and drawn['mark_label'] == 'exported adapter: last epoch'
