"""report.json / report.html: numbers, relative links that exist, escaped prompts, schema errors."""
import json
import math

import numpy as np
import pytest
import soundfile

from audiocraft_lora.diagnostics import audio_diagnostics
from audiocraft_lora.errors import UserError
from audiocraft_lora.report import referenced_files, write_report

EVIL_PROMPT = 'trap beat <script>alert("x")</script> & "808"'
PROMPTS = ['hip hop 808 beat with trap drums', EVIL_PROMPT]
MODELS = ['base', 'adapter:trap_r32']


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f'non-standard JSON constant {constant}')
    return json.loads(path.read_text(encoding='utf-8'), parse_constant=refuse)


@pytest.fixture
def report_input(tmp_path, signals, sample_rate):
    """Base: steady tone; adapter: fading tone. Wav names need URL-quoting (space, '#')."""
    samples = []
    for prompt_index, prompt in enumerate(PROMPTS):
        for model_index, model in enumerate(MODELS):
            wav = signals['steady'] if model == 'base' else signals['fading']
            relative = f'audio/m{model_index} prompt #{prompt_index}.wav'
            (tmp_path / 'audio').mkdir(exist_ok=True)
            soundfile.write(tmp_path / relative, wav.astype(np.float32), sample_rate)
            samples.append({'prompt': prompt, 'seed': 0, 'model': model, 'wav': relative,
                            'diagnostics': audio_diagnostics(wav, sample_rate)})
    return {
        'models': MODELS,
        'settings': {'duration_s': 4.0, 'cfg_coef': 3.0, 'top_k': 250, 'seeds': [0], 'unused': float('nan')},
        'samples': samples,
        'cross_entropy': {'base': {'per_codebook': [3.0, 3.5, 4.0, 4.5], 'split': 'valid'},
                          'adapter:trap_r32': {'per_codebook': [2.5, 3.5, 4.0, 4.0], 'split': 'valid'}},
        'history': {'adapter:trap_r32': [{'train': {'ce': 4.0}, 'valid': {'ce': 3.9}},
                                         {'train': {'ce': 3.6}, 'valid': {'ce': 3.7}}]},
        'skipped': ['CLAP: no local model given', {'name': 'FAD', 'reason': 'no reference set'}],
    }


def test_report_files_numbers_and_links(tmp_path, report_input):
    files = write_report(tmp_path, report_input)
    assert files.json_path == tmp_path / 'report.json' and files.html_path == tmp_path / 'report.html'
    document = _strict_json(files.json_path)
    assert document['models'] == MODELS and document['base_model'] == 'base'
    assert document['settings']['unused'] is None and document['settings']['top_k'] == 250
    assert document['thresholds']['silence_threshold_dbfs'] == -60.0 and document['thresholds']['fade_db'] == -10.0
    flags = {(s['prompt'], s['model']): s['flags'] for s in document['samples']}
    assert flags[(EVIL_PROMPT, 'base')] == [] and flags[(EVIL_PROMPT, 'adapter:trap_r32')] == ['fades']
    fade = document['comparisons']['adapter:trap_r32']['metrics']['fade_ratio_db']
    assert fade['base'] == pytest.approx(0.0, abs=0.05) and fade['diff'] < -12
    assert document['aggregates']['adapter:trap_r32']['flag_rates']['fades'] == 1.0
    ce = document['cross_entropy']['adapter:trap_r32']
    assert ce['perplexity_per_codebook'][0] == pytest.approx(math.exp(2.5))
    assert ce['diff_to_base_per_codebook'] == pytest.approx([-0.5, 0.0, 0.0, -0.5])

    referenced = referenced_files(files.html_path)
    missing = [p for p in referenced if not p.is_file()]
    assert not missing, missing
    resolved = {p.resolve() for p in referenced}
    for sample in document['samples']:  # every wav and spectrogram is linked
        assert (tmp_path / sample['wav']).resolve() in resolved
        assert (tmp_path / sample['spectrogram']).resolve() in resolved
    names = {p.name for p in referenced}
    assert {'cross_entropy.png', 'history_m1.png'} <= names
    assert sum(name.endswith('_loudness.png') for name in names) == len(PROMPTS)


def test_html_escapes_prompts_and_lists_skipped(tmp_path, report_input):
    page = write_report(tmp_path, report_input, spectrograms=False).html_path.read_text(encoding='utf-8')
    assert '<script>' not in page
    assert '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;808&quot;' in page
    assert page.count('<audio controls') == len(PROMPTS) * len(MODELS)
    assert 'CLAP: skipped, no local model given' in page and 'FAD: skipped, no reference set' in page
    assert 'Cross-entropy per codebook' in page
    assert '<td class="flag">' in page  # the adapter's fade is highlighted
    assert not [p for p in referenced_files(tmp_path / 'report.html') if 'spectrogram' in p.name]


def test_referenced_files_ignores_external_links(tmp_path):
    page = tmp_path / 'page.html'
    page.write_text('<a href="#top">x</a><img src="https://x.org/a.png"><img src="data:image/png;base64,AA">'
                    '<audio src="a%20b.wav"></audio><img src="figs/c.png"><img src="figs/c.png">', encoding='utf-8')
    assert referenced_files(page) == [tmp_path / 'a b.wav', tmp_path / 'figs' / 'c.png']


@pytest.mark.parametrize('mutate,message', [
    (lambda r: r['samples'][0].update(model='adapter:typo'), "'adapter:typo' is not in models"),
    (lambda r: r['samples'][0].update(wav='audio/nowhere.wav'), 'nowhere.wav.*does not exist'),
    (lambda r: r['samples'].append(dict(r['samples'][0])), 'duplicate sample'),
    (lambda r: r.update(skiped=[]), r"unknown keys \['skiped'\]"),
    (lambda r: r.update(models=['base']), "'adapter:trap_r32' is not in models"),
    (lambda r: r.update(base_model='nope'), "'nope' is not in models"),
    (lambda r: r['samples'][0].update(diagnostics={'fade_ratio_db': 0.0}), 'diagnostics lack'),
    (lambda r: r['settings'].update(device=object()), r"\['device'\] holds a object"),
])
def test_schema_errors_name_the_problem(tmp_path, report_input, mutate, message):
    mutate(report_input)
    with pytest.raises(UserError, match=message):
        write_report(tmp_path, report_input, spectrograms=False)
    assert not (tmp_path / 'report.html').exists()


def test_model_without_samples_is_refused(tmp_path, report_input):
    report_input['models'] = MODELS + ['adapter:other']
    with pytest.raises(UserError, match="'adapter:other' has no samples"):
        write_report(tmp_path, report_input, spectrograms=False)


def test_report_flags_a_sample_quieter_than_the_base_sample(tmp_path, report_input, signals, sample_rate):
    quiet = signals['steady'] * 10 ** (-30 / 20)  # the adapter's first prompt: a steady tone, 30 dB quieter
    soundfile.write(tmp_path / 'audio' / 'quiet.wav', quiet.astype(np.float32), sample_rate)
    first = next(s for s in report_input['samples'] if s['model'] == 'adapter:trap_r32')
    first.update(wav='audio/quiet.wav', diagnostics=audio_diagnostics(quiet, sample_rate))
    document = _strict_json(write_report(tmp_path, report_input, spectrograms=False).json_path)
    flags = {(s['prompt'], s['model']): s['flags'] for s in document['samples']}
    assert flags[(first['prompt'], 'adapter:trap_r32')] == ['quieter_than_base']
    assert flags[(first['prompt'], 'base')] == []
    assert document['comparisons']['adapter:trap_r32']['pairs'] == len(PROMPTS)
    rates = document['comparisons']['adapter:trap_r32']['pair_flag_rates']
    assert rates == {'quieter_than_base': pytest.approx(1 / len(PROMPTS)), 'noisier_than_base': 0.0}
    assert document['aggregates']['adapter:trap_r32']['flag_rates']['quieter_than_base'] == rates['quieter_than_base']
    assert 'quieter_than_base' not in document['aggregates']['base']['flag_rates']
    assert document['thresholds']['quieter_than_base_lu'] == 6.0
    page = (tmp_path / 'report.html').read_text(encoding='utf-8')
    assert '<span class="badge">quieter_than_base</span>' in page and 'flag rate: silent_tail' in page


def test_figure_titles_name_the_wav_files_and_ce_mean_has_its_difference(tmp_path, report_input, signals,
                                                                         sample_rate):
    for sample in report_input['samples']:  # as `generate` names them: <NN>_<slug>_seed<seed>.wav per model folder
        index = PROMPTS.index(sample['prompt'])
        relative = f'audio/{sample["model"].replace(":", "_")}/{index:02d}_prompt_seed0.wav'
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sample['wav']).rename(tmp_path / relative)
        sample['wav'] = relative
    document = _strict_json(write_report(tmp_path, report_input, spectrograms=False).json_path)
    assert [g['label'] for g in document['groups']] == [f'{i:02d}_prompt' for i in range(len(PROMPTS))]
    page = (tmp_path / 'report.html').read_text(encoding='utf-8')
    assert '<h3>00_prompt, seed 0' in page and 'Prompt 1,' not in page
    ce = document['cross_entropy']
    assert ce['adapter:trap_r32']['diff_to_base_mean'] == pytest.approx(3.5 - 3.75)
    assert '3.500 <small>(-0.250)</small>' in page


def test_history_figure_marks_the_exported_epoch(tmp_path, report_input):
    report_input['history']['adapter:trap_r32'].append({'train': {'ce': 3.0}, 'valid': {'ce': 3.8}})
    document = _strict_json(write_report(tmp_path, report_input, spectrograms=False).json_path)
    assert document['exported_epoch'] == {'adapter:trap_r32': {'epoch': 2, 'source': 'lowest valid CE'}}
    assert 'Exported adapter: epoch 2 (lowest valid CE)' in (tmp_path / 'report.html').read_text(encoding='utf-8')
    report_input['exported_epoch'] = {'adapter:trap_r32': 3}  # adapter_config.json's epoch wins
    document = _strict_json(write_report(tmp_path, report_input, spectrograms=False).json_path)
    assert document['exported_epoch']['adapter:trap_r32'] == {'epoch': 3, 'source': 'adapter config'}
    report_input['exported_epoch'] = {'adapter:trap_r32': 0}
    with pytest.raises(UserError, match='1-based epoch'):
        write_report(tmp_path, report_input, spectrograms=False)
