"""Run a dora grid here, one XP after the other (`dora grid` itself only submits to SLURM).

    python -m audiocraft_lora.local_grid lora_debug_sweep              # run the grid's XPs, then show its table
    python -m audiocraft_lora.local_grid lora_sweep rank=16 '!attn'    # dora's name patterns select XPs
    python -m audiocraft_lora.local_grid lora_sweep --dry_run          # list sig + overrides per XP, run nothing

Run from the root of the checkout (as `dora`). The XPs are exactly those of `dora grid <name>`: the grid's
explorer is called with dora's own Launcher, each XP is initialised and linked in `<dora dir>/grids/<name>` (what
`dora grid` does, and what grids/lora_eval.py reads), then trained with `dora run <its overrides>` in a subprocess.
Finished XPs are skipped (training: optim.epochs epochs in the history; `execute_only` XPs: any history), others
start or resume. Base model / dataset: the LORA_SWEEP_* environment variables (grids/_sweep.py). Exit status 1 if
any XP failed (the others still run), with their log folders listed.
"""
import argparse
import os
from pathlib import Path
import shlex
import subprocess
import sys
import typing as tp

from . import train
from .checkout import ROOT


def grid_sheeps(name: str) -> tp.Tuple[tp.Any, list]:
    """(explorer, sheeps) of grid `name`, as `dora grid` builds them."""
    from dora.explore import Herd, Launcher
    from dora.grid import _get_explore
    from dora.shep import Shepherd
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the `grids` package, as dora does from the checkout's root
    main = train.main
    explorer = _get_explore(argparse.Namespace(grid=name), main)
    herd = Herd()
    launcher = Launcher(Shepherd(main), main.get_slurm_config(), herd)
    explorer(launcher)
    herd.complete()
    return explorer, list(herd.sheeps.values())


def link_grid(name: str, sheeps: list, all_sheeps: tp.Optional[list] = None) -> Path:
    """Initialise the XPs and link them in <dora dir>/grids/<name> (as `dora grid`); stale links are removed."""
    main = train.main
    folder = main.dora.dir / main.dora._grids / name
    folder.mkdir(parents=True, exist_ok=True)
    keep = {sheep.xp.sig for sheep in (all_sheeps if all_sheeps is not None else sheeps)}
    for child in folder.iterdir():
        if child.is_symlink() and child.name not in keep:
            child.unlink()
    for sheep in sheeps:
        main.init_xp(sheep.xp)
        link = folder / sheep.xp.sig
        if not link.is_symlink():
            link.symlink_to(sheep.xp.folder)
    return folder


def is_finished(xp) -> bool:
    history = train.main.get_xp_history(xp)
    if xp.cfg.get('execute_only'):
        return len(history) > 0
    return len(history) >= int(xp.cfg.optim.epochs)


def run_xp(argv: tp.Sequence[str]) -> int:
    """`dora run <argv>` from the checkout's root, output streamed; returns its exit status."""
    dora = Path(sys.executable).parent / 'dora'
    cmd = [str(dora) if dora.exists() else 'dora', 'run'] + list(argv)
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ)).returncode


def show_table(explorer, sheeps: list) -> None:
    from dora.grid import RunGridArgs, monitor
    monitor(RunGridArgs(monitor=False), train.main, explorer, sheeps, print)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m audiocraft_lora.local_grid', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('grid', help="grid name: a module of grids/ (lora_sweep, lora_debug_sweep, lora_eval)")
    parser.add_argument('patterns', nargs='*', help="only the XPs whose name matches all patterns (dora's syntax)")
    parser.add_argument('--dry_run', action='store_true', help="list the XPs (sig and overrides), run nothing")
    args = parser.parse_args(argv)
    explorer, all_sheeps = grid_sheeps(args.grid)
    from dora.grid import _filter_grid_sheeps
    sheeps = _filter_grid_sheeps(list(args.patterns), train.main, list(all_sheeps))
    if args.dry_run:
        for index, sheep in enumerate(sheeps):
            print(f"{index}\t{sheep.xp.sig}\t{shlex.join(sheep.xp.argv)}")  # paste after `dora run`
        print(f"{len(sheeps)} XPs in grid {args.grid}")
        return 0
    link_grid(args.grid, sheeps, all_sheeps)
    failed = []
    for index, sheep in enumerate(sheeps):
        name = f"[{index + 1}/{len(sheeps)}] {sheep.xp.sig}"
        if is_finished(sheep.xp):
            print(f"{name}: finished, skipped", flush=True)
            continue
        print(f"{name}: dora run {shlex.join(sheep.xp.argv)}", flush=True)
        if run_xp(sheep.xp.argv) != 0:
            failed.append(sheep)
    show_table(explorer, sheeps)
    if failed:
        print("Failed XPs (logs in each folder):\n" + '\n'.join(f"  {s.xp.sig}  {s.xp.folder}" for s in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
