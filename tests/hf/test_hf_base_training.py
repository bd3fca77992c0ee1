"""A local HF-transformers MusicGen folder as `base_model`: converted once, then trained on offline."""
import copy

import torch

from helpers import DEBUG_ARGS, build_solver


def test_training_steps_on_a_local_hf_folder_change_only_the_adapter(dora_dir, hf_text_dir):
    solver, _ = build_solver(DEBUG_ARGS + [f'base_model={hf_text_dir}'])
    assert solver.base.kind == 'hf_dir'
    assert solver.cfg.conditioners.description.model == 't5'  # architecture from the HF folder, not from yaml
    solver.model.cfg_dropout.p = 0.0
    before = copy.deepcopy(solver.model.state_dict())
    loader = iter(solver.dataloaders['train'])
    solver._current_stage = 'train'
    solver.model.train()
    for idx in range(2):
        metrics = solver.run_step(idx, next(loader), {})
        assert torch.isfinite(metrics['ce'])
    solver._current_stage = None
    changed = {k for k, v in solver.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all('.lora_' in k for k in changed)
