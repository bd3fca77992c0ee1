"""dora grids of audiocraft-lora (`main.dora.grid_package = 'grids'` in audiocraft_lora/train.py).

    lora_sweep        rank x lr x targets on a recipe, plus a dataset-size / epochs axis      (LoRAExplorer)
    lora_debug_sweep  2 tiny XPs on the debug base and egs/example, CPU: tests and a dry run   (LoRAExplorer)
    lora_eval         re-runs evaluate + generate on the finished XPs of a sweep               (LoRAEvalExplorer)

`dora grid <name>` submits to SLURM (settings: `slurm.*` in config/config.yaml, or `dora grid -g/-p/...`).
`python -m audiocraft_lora.local_grid <name>` runs the same XPs one after the other on this machine.
`dora grid` takes no config overrides: the base model, dataset and recipe come from environment variables
(see `_sweep.py`), e.g. `LORA_SWEEP_DSET=audio/trap LORA_SWEEP_BASE=/models/musicgen-small dora grid lora_sweep`.
Helpers live in `_`-prefixed modules, which dora does not list as grids.
"""
