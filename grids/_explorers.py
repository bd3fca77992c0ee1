"""Explorers: what `dora grid <name>` shows for each XP (AudioCraft's LMExplorer / GenerationEvalExplorer, for LoRA).

LoRAExplorer (lora_sweep, lora_debug_sweep):
    train     epoch, duration (min, last epoch), ping (time since the log moved), ce, ppl   (last epoch)
    valid     ce, best_ce (lowest over the epochs: the best adapter is chosen on it), ppl
    generate  fade_db (`gen_fade_ratio_db`), silence (`gen_silence_fraction`): the fade diagnostic of the last
              generate stage that logged it; '-' while no generate stage has logged it.
LoRAEvalExplorer (lora_eval): the evaluate metrics (ce, ppl, and fad/kld/text_consistency when enabled) and the same
    fade diagnostic, from the XPs that re-run one stage on a trained adapter.

Written on `dora.Explorer` directly: AudioCraft's `BaseExplorer` is the same few lines but importing it loads all
of AudioCraft (seconds) on every `dora grid` call.
"""
import time
import typing as tp

from dora import Explorer
import treetable as tt

FADE_METRICS = {'fade_db': 'gen_fade_ratio_db', 'silence': 'gen_silence_fraction'}


def sheep_ping(sheep) -> tp.Optional[str]:
    """Time since the XP's log last changed (as AudioCraft's `get_sheep_ping`), e.g. '3.2m'; None without a log."""
    log = getattr(sheep, 'log', None)  # the SLURM job's log; for local runs, the solver's own
    if log is None or not log.exists():
        log = sheep.xp.folder / 'solver.log.0'
    if not log.exists():
        return None
    delta = time.time() - log.stat().st_mtime
    for unit, seconds in (('d', 86400), ('h', 3600), ('m', 60)):
        if delta > seconds:
            return f'{delta / seconds:.1f}{unit}'
    return f'{delta:.1f}s'


def last_stage_metrics(history: tp.List[dict], stage: str) -> dict:
    """Metrics of the last epoch that ran `stage` ({} if none did)."""
    for epoch in reversed(history):
        if stage in epoch:
            return dict(epoch[stage])
    return {}


def fade_diagnostic(history: tp.List[dict]) -> dict:
    """`fade_db` / `silence` from the last generate stage that logged them ({} if none did)."""
    for epoch in reversed(history):
        generate = epoch.get('generate', {})
        if any(name in generate for name in FADE_METRICS.values()):
            return {short: generate[name] for short, name in FADE_METRICS.items() if name in generate}
    return {}


def _fade_group():
    return tt.group('generate', [tt.leaf('fade_db', '.2f', missing='-'), tt.leaf('silence', '.3f', missing='-')],
                    align='>')


class LoRAExplorer(Explorer):
    """Per training XP: train CE, valid CE, best valid CE, and the fade diagnostic of the generated samples."""

    def get_grid_meta(self):
        return [
            tt.leaf('index', align='>'),
            tt.leaf('name', wrap=140),
            tt.leaf('state'),
            tt.leaf('sig', align='>'),
            tt.leaf('sid', align='<'),
        ]

    def get_grid_metrics(self):
        return [
            tt.group('train', [
                tt.leaf('epoch'),
                tt.leaf('duration', '.1f', missing='-'),  # minutes, last epoch
                tt.leaf('ping', missing='-'),
                tt.leaf('ce', '.4f', missing='-'),
                tt.leaf('ppl', '.2f', missing='-'),
            ], align='>'),
            tt.group('valid', [
                tt.leaf('ce', '.4f', missing='-'),
                tt.leaf('best_ce', '.4f', missing='-'),
                tt.leaf('ppl', '.2f', missing='-'),
            ], align='>'),
            _fade_group(),
        ]

    def process_sheep(self, sheep, history: tp.List[dict]) -> dict:
        train = last_stage_metrics(history, 'train')
        if 'duration' in train:
            train['duration'] = train['duration'] / 60
        train['epoch'] = len(history)
        ping = sheep_ping(sheep)
        if ping is not None:
            train['ping'] = ping
        valid = last_stage_metrics(history, 'valid')
        valid_ces = [epoch['valid']['ce'] for epoch in history if 'ce' in epoch.get('valid', {})]
        if valid_ces:
            valid['best_ce'] = min(valid_ces)
        return {'train': train, 'valid': valid, 'generate': fade_diagnostic(history)}


class LoRAEvalExplorer(Explorer):
    """Per evaluation XP (one stage re-run on a trained adapter): evaluate metrics and the fade diagnostic."""

    def get_grid_meta(self):
        return LoRAExplorer.get_grid_meta(self)  # type: ignore[arg-type]

    def get_grid_metrics(self):
        return [
            tt.group('evaluate', [
                tt.leaf('ce', '.4f', missing='-'),
                tt.leaf('ppl', '.2f', missing='-'),
                tt.leaf('fad', '.3f', missing='-'),
                tt.leaf('kld', '.3f', missing='-'),
                tt.leaf('text_consistency', '.3f', missing='-'),
            ], align='>'),
            _fade_group(),
        ]

    def process_sheep(self, sheep, history: tp.List[dict]) -> dict:
        return {'evaluate': last_stage_metrics(history, 'evaluate'), 'generate': fade_diagnostic(history)}
