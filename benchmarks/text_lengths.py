"""How many training steps the CUDA graphs of the layers replay, given the text lengths a dataset's batches have.

A graph replays one text-conditioning length (`audiocraft_lora/layer_graphs.py`); AudioCraft pads a batch's text to
its longest description, and its text augmentation (`dataset.train.merge_text_p`, `drop_desc_p`, `drop_other_p`)
merges metadata into, or in place of, the descriptions. This script draws batches as MusicDataset would (shuffled
epochs, that augmentation, whole-batch classifier-free-guidance dropout), tokenizes them as MusicGen's T5 conditioner
does, and plays the graphs' rule: the first `--shapes` signatures seen get graphs, later ones run eagerly (each layer
recomputed). It prints, for exact lengths and for lengths padded to multiples of `--bucket` (`lora.graph_text_bucket`,
text_buckets.py), the signatures met and the share of steps replayed, with the mean step time that share gives at
the H100 timings of session 12 (musicgen-small x 30 s, batch 4 and 16; or `--graphed`, `--eager` seconds).

    python benchmarks/text_lengths.py                          # 80 made-up trap clips with metadata
    python benchmarks/text_lengths.py egs/mine/train/data.jsonl --batch 16

Needs a T5 tokenizer (`--tokenizer t5-base`, MusicGen's; offline it takes a cached one, t5-small shares its vocab).
"""
import argparse
import collections
import json
from pathlib import Path
import random
import typing as tp

FIELDS = ('description', 'genre', 'moods', 'keywords', 'instrument', 'key', 'bpm')
# seconds per step (graphed, eager) at musicgen-small x 30 s, bf16, on an H100 (session 12, benchmarks/step_time.py)
H100_SMALL = {4: (0.0575, 0.166), 16: (0.189, 0.208)}


def made_up_clips(count: int = 80, seed: int = 0) -> tp.List[dict]:
    """Metadata like a producer's trap folder: a description of 5-14 words, genre, moods, keywords, bpm, key."""
    rng = random.Random(seed)
    words = ("dark energetic trap beat with heavy 808 bass hard hi hats rolling snares eerie bells melodic piano "
             "ambient pads").split()
    moods = ['dark', 'energetic', 'aggressive', 'chill', 'melancholic', 'hypnotic']
    clips = []
    for _ in range(count):
        description = ' '.join(rng.choice(words) for _ in range(rng.randint(5, 14)))
        bpm = rng.choice([130, 140, 150])
        clips.append({'description': f'{description}, {bpm} bpm', 'genre': rng.choice(['trap', 'drill', 'phonk']),
                      'moods': rng.sample(moods, 2), 'keywords': rng.sample(words, 3), 'instrument': '808',
                      'key': 'F minor', 'bpm': float(bpm)})
    return clips


def manifest_clips(path: Path) -> tp.List[dict]:
    """The sidecar metadata (`<audio>.json`) of each entry of an AudioCraft manifest."""
    clips = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        audio = Path(json.loads(line)['path'])
        sidecar = audio.with_suffix('.json')
        info = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        clips.append({k: info[k] for k in FIELDS if info.get(k) is not None})
    return clips


def tokenizer(name: str):
    from transformers import AutoTokenizer
    for candidate, local in ((name, True), ('t5-small', True), (name, False)):
        try:
            return AutoTokenizer.from_pretrained(candidate, local_files_only=local)
        except Exception:
            continue
    raise SystemExit(f"No T5 tokenizer: `{name}` is neither cached nor downloadable here.")


def batch_lengths(clips, tok, batch: int, steps: int, merge: float, drop_desc: float, drop_other: float,
                  cfg_dropout: float, seed: int = 0) -> tp.List[int]:
    """The text length (T5 tokens, the batch's longest) of each of `steps` training batches."""
    from audiocraft.data.audio_dataset import AudioMeta
    from audiocraft.data.music_dataset import MusicInfo, augment_music_info_description
    random.seed(seed)  # (AudioCraft's augmentation draws from `random`)
    meta = AudioMeta(path='clip.wav', duration=30.0, sample_rate=32000)
    lengths: tp.List[int] = []
    while len(lengths) < steps:
        order = list(range(len(clips)))
        random.shuffle(order)
        for start in range(0, len(order) - batch + 1, batch):
            if random.random() < cfg_dropout:  # AudioCraft drops every condition of the batch at once
                descriptions = [''] * batch
            else:
                descriptions = []
                for index in order[start:start + batch]:
                    info = MusicInfo(meta=meta, seek_time=0.0, n_frames=1, total_frames=1, sample_rate=32000,
                                     channels=1, **clips[index])
                    info = augment_music_info_description(info, merge, drop_desc, drop_other)
                    descriptions.append(info.description or '')
            lengths.append(max(len(tok(d).input_ids) for d in descriptions))
            if len(lengths) == steps:
                break
    return lengths


def replayed(lengths: tp.Sequence[int], shapes: int, bucket: int) -> tp.Tuple[float, int]:
    """The share of steps with a graph, and the signatures met, by the graphs' rule: the first `shapes` padded
    lengths met get one; with padding (`bucket` > 1: masked keys) a step whose own has none, once they are all
    taken, replays the shortest captured length that holds it (layer_graphs.LayerGraphs.padded_size)."""
    from audiocraft_lora.text_buckets import padded_length
    captured: tp.Set[int] = set()
    hits = 0
    for length in lengths:
        size = padded_length(length, bucket)
        if size in captured or len(captured) < shapes:
            captured.add(size)
            hits += 1
        elif bucket > 1 and any(c >= length for c in captured):
            hits += 1
    return hits / len(lengths), len({padded_length(n, bucket) for n in lengths})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('manifest', nargs='?', type=Path, help="an AudioCraft jsonl (default: made-up clips)")
    parser.add_argument('--batch', type=int, nargs='+', default=[4, 16])
    parser.add_argument('--steps', type=int, default=500)
    parser.add_argument('--shapes', type=int, default=8, help="lora.graph_shapes")
    parser.add_argument('--bucket', type=int, default=32, help="lora.graph_text_bucket")
    parser.add_argument('--merge-text-p', type=float, default=0.25)
    parser.add_argument('--drop-desc-p', type=float, default=0.5)
    parser.add_argument('--drop-other-p', type=float, default=0.5)
    parser.add_argument('--cfg-dropout', type=float, default=0.2)
    parser.add_argument('--tokenizer', default='t5-base')
    parser.add_argument('--graphed', type=float, help="s per graphed step (default: H100, musicgen-small)")
    parser.add_argument('--eager', type=float, help="s per eager step (default: H100, musicgen-small)")
    parser.add_argument('--recompute', type=float, default=1.3, help="a step beyond the graphs, x an eager step")
    args = parser.parse_args()
    clips = manifest_clips(args.manifest) if args.manifest else made_up_clips()
    tok = tokenizer(args.tokenizer)
    print(f"{len(clips)} clips; augmentation merge/drop_desc/drop_other {args.merge_text_p}/{args.drop_desc_p}/"
          f"{args.drop_other_p}, CFG dropout {args.cfg_dropout}; {args.steps} steps; graph_shapes={args.shapes}")
    print(f"{'batch':>5} {'text':>12} {'lengths':>8} {'signatures':>10} {'replayed':>8} {'mean step s':>11} "
          f"{'vs eager':>8}")
    for batch in args.batch:
        lengths = batch_lengths(clips, tok, batch, args.steps, args.merge_text_p, args.drop_desc_p,
                                args.drop_other_p, args.cfg_dropout)
        graphed, eager = H100_SMALL.get(batch, (float('nan'), float('nan')))
        graphed, eager = args.graphed or graphed, args.eager or eager
        for label, bucket in (('exact', 1), (f'bucket {args.bucket}', args.bucket)):
            share, signatures = replayed(lengths, args.shapes, bucket)
            mean = share * graphed + (1 - share) * args.recompute * eager
            print(f"{batch:>5} {label:>12} {len(set(lengths)):>8} {signatures:>10} {share:>8.0%} "
                  f"{mean:>11.4f} {mean / eager:>7.2f}x")
        common = collections.Counter(lengths).most_common(3)
        print(f"{'':>5} most common lengths {common}, range {min(lengths)}-{max(lengths)} tokens")


if __name__ == '__main__':
    main()
