"""A real training run of the solver at MusicGen's shapes (random weights), for a GPU machine: seconds per step with
everything a step does (data loading, EnCodec's encode, the LM step), the plans `auto` took, and the GPU memory at
the peak against what the memory plan counted.

    python benchmarks/solver_run.py --scale small --batch 16 --seconds 30 --steps 10
    python benchmarks/solver_run.py --scale tiny --batch 2 --seconds 2 --steps 2 --device cpu   # a smoke run (~1 min)

Writes, under `--out` (default: a new temporary folder):
- a random base at the scale, as an AudioCraft folder (`state_dict.bin` + `compression_state_dict.bin`): the LM of
  step_time.SCALES with MusicGen's 4 codebooks of 2048 and cross-attention on the text, EnCodec 32 kHz (SEANet 64
  filters, ratios 8-5-4-4, 2 LSTM layers, 4 x 2048 RVQ); a lookup table stands in for T5 (one text token a clip);
- `--clips` synthetic music clips of `--seconds` s with captions, made a dataset by `audiocraft-lora prepare`;
then runs `dora run solver=musicgen/lora_small` on them for two epochs of `--steps` steps (the first captures the
layers' CUDA graphs; the second is timed), no evaluation or generation, and prints the solver's lines that matter.
Extra `dora run` overrides go after `--`.
"""
import argparse
import copy
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import tempfile
import typing as tp

import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # noqa: E402  (SCALES)

SPLITS = ('train', 'valid', 'evaluate', 'generate')
SHOWN = re.compile(r"Activation checkpointing|EnCodec encodes|CUDA graphs|Merged LoRA weights|Train Summary|"
                   r"GPU memory at|Estimated peak|Error|error|Traceback")


def write_base(folder: Path, scale: str) -> Path:
    """A random MusicGen-shaped base (AudioCraft folder) at `scale`."""
    from omegaconf import OmegaConf
    from audiocraft.models import builders
    from audiocraft_lora import debug_base
    from audiocraft_lora.checkpoint_io import atomic_torch_save
    dim, heads, layers = step_time.SCALES[scale]
    lm_cfg = copy.deepcopy(debug_base.LM_CFG)
    lm_cfg['transformer_lm'].update(dim=dim, num_heads=heads, num_layers=layers, card=2048, cross_attention=True)
    lm_cfg['conditioners']['description']['lut'].update(n_bins=1024, dim=768)
    cm_cfg = copy.deepcopy(debug_base.COMPRESSION_CFG)
    cm_cfg['seanet'].update(dimension=128, n_filters=64, ratios=[8, 5, 4, 4], lstm=2)
    cm_cfg['rvq'].update(bins=2048, kmeans_init=False)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, cfg, build in (('compression_state_dict.bin', cm_cfg, builders.get_compression_model),
                             ('state_dict.bin', lm_cfg, builders.get_lm_model)):
        cfg = OmegaConf.create(cfg)
        model = build(cfg)
        atomic_torch_save({'best_state': model.state_dict(), 'xp.cfg': OmegaConf.to_yaml(cfg), 'version': 1},
                          folder / name)
        del model
    return folder


def write_clips(folder: Path, clips: int, seconds: float) -> Path:
    """`clips` synthetic music clips of `seconds` s (FLAC, 32 kHz mono) with a caption each."""
    from audiocraft_lora import debug_base
    from audiocraft_lora.data.audio_files import write_audio  # (PyAV: no ffmpeg program needed)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    styles = ['dark trap beat, 808 bass', 'lofi hip hop, dusty drums', 'house groove, four on the floor',
              'drill beat, sliding 808s']
    for index in range(clips):
        wav = debug_base._synthetic_music(1, seconds, generator)[0]
        write_audio(folder / f'clip_{index:03d}.flac', wav, debug_base.SAMPLE_RATE)
        (folder / f'clip_{index:03d}.json').write_text(json.dumps({'description': styles[index % len(styles)]}))
    return folder


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scale', default='small', choices=sorted(step_time.SCALES))
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--seconds', type=float, default=30)
    parser.add_argument('--steps', type=int, default=10, help='steps per epoch (two epochs)')
    parser.add_argument('--clips', type=int, default=0, help='default: enough for two batches and a valid split')
    parser.add_argument('--workers', type=int, default=4, help='dataset.num_workers')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--out', help='folder for the base, clips, dataset and XP (default: a temporary one)')
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != '--']
    out = Path(args.out or tempfile.mkdtemp(prefix='solver_run_')).resolve()
    base = out / f'base_{args.scale}'
    if not (base / 'state_dict.bin').exists():
        write_base(base, args.scale)
    clips = out / 'clips'
    if not clips.exists():
        write_clips(clips, args.clips or max(2 * args.batch + 4, 10), args.seconds)
    env = dict(os.environ, AUDIOCRAFT_LORA_DORA_DIR=str(out / 'xps'), PYTHONUNBUFFERED='1')
    if not (out / 'egs' / 'run' / 'train' / 'data.jsonl').exists():  # (its dset yaml stays out of the checkout)
        subprocess.run([sys.executable, '-m', 'audiocraft_lora.cli', 'prepare', str(clips), '--name', 'run',
                        '--egs-root', str(out / 'egs'), '--config-root', str(out / 'config'), '--relative-to',
                        str(out), '--valid-ratio', '0.2'], cwd=out, env=env, check=True)
    autocast = ['autocast=true', 'autocast_dtype=bfloat16'] if args.device == 'cuda' else ['autocast=false']
    cmd = [sys.executable, '-m', 'dora', '-P', 'audiocraft_lora', 'run', '--clear', 'solver=musicgen/lora_small',
           f'base_model={base}', *[f'datasource.{split}=egs/run/{split}' for split in SPLITS],
           f'device={args.device}', *autocast,
           f'dataset.batch_size={args.batch}', f'dataset.segment_duration={args.seconds:g}',
           f'dataset.num_workers={args.workers}', 'optim.epochs=2', f'optim.updates_per_epoch={args.steps}',
           f'dataset.valid.num_samples={args.batch}', 'evaluate.every=1000', 'generate.every=1000', *extra]
    print(' '.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / 'solver_run.log').write_text(log)
    for line in log.splitlines():
        if SHOWN.search(line):
            print(re.sub(r'\x1b\[[0-9;]*m', '', line)[-400:])
    durations = [float(m) for m in re.findall(r'Train Summary \| Epoch \d+ \|.*?duration=([0-9.]+)', log)]
    if len(durations) == 2:
        print(f"seconds per step, epoch 2 (warm): {durations[1] / args.steps:.4f} (epoch 1, captures included: "
              f"{durations[0] / args.steps:.4f}); scale {args.scale}, batch {args.batch} x {args.seconds:g} s, "
              f"{args.device}")
    print(f"dora rc={proc.returncode}; the whole log: {out / 'solver_run.log'}")
    return proc.returncode


if __name__ == '__main__':
    sys.exit(main())
