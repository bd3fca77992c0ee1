"""Re-run the evaluate and generate stages on the finished XPs of a sweep (AudioCraft's eval-grid pattern).

    dora grid lora_eval                                          # the XPs of grids/lora_sweep, on SLURM
    LORA_EVAL_GRID=lora_debug_sweep python -m audiocraft_lora.local_grid lora_eval   # here
    dora grid lora_eval --dry_run --no_monitoring                # evaluate CE and the fade diagnostic per XP

For each finished XP of the sweep (its history has optim.epochs epochs), two XPs: its own overrides plus
`continue_from=//sig/<its sig>` (its best adapter is loaded) and `execute_only=evaluate` (CE / ppl on the evaluate
split, `evaluate.metrics.base=true`) or `execute_only=generate` (samples and the fade diagnostic). Each writes its
metrics to its own history, shown by LoRAEvalExplorer. The sweep's XPs are the ones linked in
<dora dir>/grids/<sweep> (`dora grid` and `audiocraft_lora.local_grid` make the links); unfinished ones are skipped
(re-run this grid once they are done). More overrides for every evaluation XP: LORA_EVAL_ARGS (shell-quoted), e.g.
'evaluate.metrics.fad=true dataset.evaluate.num_samples=500'.
"""
import os
import shlex

from dora.log import fatal, simple_log

from ._explorers import LoRAEvalExplorer

STAGES = ('evaluate', 'generate')


def finished_xps(main, sweep: str):
    """(xp, history) of the sweep's XPs whose training is finished, in signature order."""
    folder = main.dora.dir / main.dora._grids / sweep
    if not folder.is_dir():
        fatal(f"No grid {sweep!r} in {folder.parent}: run `dora grid {sweep}` (or "
              f"`python -m audiocraft_lora.local_grid {sweep}`) first, or set LORA_EVAL_GRID.")
    out = []
    for link in sorted(folder.iterdir()):
        xp = main.get_xp_from_sig(link.name)
        history = main.get_xp_history(xp)
        if len(history) >= int(xp.cfg.optim.epochs) and (xp.folder / 'checkpoint.th').exists():
            out.append(xp)
        else:
            simple_log('lora_eval:', f"skipping {link.name}: {len(history)}/{xp.cfg.optim.epochs} epochs done.")
    return out


@LoRAEvalExplorer
def explorer(launcher):
    from audiocraft_lora import train
    sweep = os.environ.get('LORA_EVAL_GRID') or 'lora_sweep'
    extra = shlex.split(os.environ.get('LORA_EVAL_ARGS', ''))
    launcher.slurm_(gpus=1)
    with launcher.job_array():
        for xp in finished_xps(train.main, sweep):
            trained = launcher.bind(list(xp.argv), {'continue_from': f'//sig/{xp.sig}'})
            for stage in STAGES:
                args = {'execute_only': stage, 'label': f'lora_eval_{stage}'}
                if stage == 'evaluate':
                    args['evaluate.metrics.base'] = True
                trained(args, extra)
