"""HF transformers MusicGen -> AudioCraft folder: same logits, same EnCodec codes, same T5 embeddings.

The converted folder is loaded with stock `MusicGen.get_pretrained` (offline, no audiocraft_lora code involved in
loading). Note on text padding: HF also masks padded text tokens out of the cross-attention while AudioCraft only
zeroes them, so the two differ on a batch with different text lengths; the texts here have equal token counts.
"""
import pytest
import torch

from hf_tiny import TEXTS, hf_delay_input, hf_logits

TOL = 1e-4


@pytest.fixture(scope='module', params=['text', 'stereo'])
def converted(request, tmp_path_factory):
    from audiocraft.models import MusicGen
    from audiocraft_lora.hf_convert import import_hf, load_hf_musicgen
    hf_dir = request.getfixturevalue('hf_text_dir' if request.param == 'text' else 'hf_stereo_dir')
    out = import_hf(hf_dir, tmp_path_factory.mktemp('converted') / 'ac')
    return request.param, load_hf_musicgen(hf_dir).model, MusicGen.get_pretrained(str(out), device='cpu'), hf_dir


def test_lm_logits_match(converted):
    from audiocraft.modules.conditioners import ConditioningAttributes
    kind, hf, mg, hf_dir = converted
    lm = mg.lm.eval()
    B, K, T = 2, lm.num_codebooks, 12
    codes = torch.randint(0, lm.card, (B, K, T), generator=torch.Generator().manual_seed(0))
    tokenizer = lm.condition_provider.conditioners['description'].t5_tokenizer
    text_inputs = tokenizer(TEXTS, return_tensors='pt', padding=True)
    assert bool(text_inputs['attention_mask'].all()), "test texts must have equal token counts (see module doc)"

    attributes = [ConditioningAttributes(text={'description': t}) for t in TEXTS]
    with torch.no_grad():
        tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        sequence, _, _ = lm.pattern_provider.get_pattern(T).build_pattern_sequence(
            codes, lm.special_token_id, keep_only_valid_steps=True)
        ac_raw = lm(sequence, [], condition_tensors=tensors)  # [B, K, S, card]
        out = lm.compute_predictions(codes, [], condition_tensors=tensors)

    hf_input = hf_delay_input(hf, codes)
    S = sequence.shape[-1]
    # the two delay patterns agree: HF's delayed input is AudioCraft's pattern sequence
    assert torch.equal(hf_input[..., :S], sequence)
    ref = hf_logits(hf, hf_input, text_inputs)
    torch.testing.assert_close(ac_raw, ref[:, :, :S], atol=TOL, rtol=0)
    # compute_predictions' valid logits [B, K, T]: code (k, t) is predicted at pattern step t + delay_k
    delays = lm.pattern_provider.delays
    mask = out.mask[0]
    assert mask.any()
    for k in range(K):
        for t in range(T):
            if mask[k, t]:
                torch.testing.assert_close(out.logits[:, k, t], ref[:, k, t + delays[k]], atol=TOL, rtol=0)
    # a different text gives different logits (the cross-attention path is really used)
    other = hf_logits(hf, hf_input, tokenizer(['soft rock guitar loud bass sub heavy'] * B, return_tensors='pt'))
    assert (other[:, :, :S] - ac_raw).abs().max() > 1e-3


def test_text_conditioning_matches(converted):
    from audiocraft.modules.conditioners import ConditioningAttributes
    kind, hf, mg, _ = converted
    conditioner = mg.lm.condition_provider.conditioners['description']
    tokenizer = conditioner.t5_tokenizer
    attributes = [ConditioningAttributes(text={'description': t}) for t in TEXTS]
    tokenized = mg.lm.condition_provider.tokenize(attributes)
    hf_inputs = tokenizer(TEXTS, return_tensors='pt', padding=True)
    assert torch.equal(tokenized['description']['input_ids'], hf_inputs['input_ids'])
    with torch.no_grad():
        t5_ours = conditioner.t5(**tokenized['description']).last_hidden_state
        t5_hf = hf.text_encoder(**hf_inputs).last_hidden_state
        embeds, mask = mg.lm.condition_provider(tokenized)['description']
        projected = t5_hf
        if hasattr(hf, 'enc_to_dec_proj'):
            projected = hf.enc_to_dec_proj(t5_hf)
    torch.testing.assert_close(t5_ours, t5_hf, atol=0, rtol=0)  # the very same T5 weights and tokens
    torch.testing.assert_close(embeds, projected * hf_inputs['attention_mask'][..., None], atol=1e-6, rtol=0)
    # text width 512 vs decoder 32: projection mapped; stereo decoder is 512 wide: identity output_proj
    assert hasattr(hf, 'enc_to_dec_proj') == (kind == 'text')


def test_cfg_and_structure(converted):
    kind, hf, mg, _ = converted
    assert mg.lm.cfg_coef == pytest.approx(3.0)
    assert mg.lm.cfg_dropout.p == pytest.approx(0.3)
    if kind == 'stereo':
        assert mg.compression_model.channels == 2 and mg.compression_model.num_codebooks == 8
        assert list(mg.lm.pattern_provider.delays) == [0, 0, 1, 1, 2, 2, 3, 3]
    else:
        assert mg.compression_model.channels == 1 and mg.compression_model.num_codebooks == 4


def test_encodec_codes_identical(hf_text_dir, tmp_path):
    from audiocraft.models import builders, loaders
    from audiocraft_lora.hf_convert import import_hf, load_hf_musicgen
    from omegaconf import OmegaConf
    hf = load_hf_musicgen(hf_text_dir).model
    out = import_hf(hf_text_dir, tmp_path / 'ac', register=False)
    comp = loaders.load_compression_model(str(out), device='cpu')
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 32000
    wav = (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(2, 1, 16000, generator=g)).float()
    wav[1] *= torch.linspace(0, 1, 16000)  # strongly asymmetric edges: padding mode matters
    with torch.no_grad():
        codes, scale = comp.encode(wav)
        hf_codes = hf.audio_encoder.encode(wav, bandwidth=8.0).audio_codes[0]
        assert scale is None
        assert torch.equal(codes, hf_codes[:, :codes.shape[1]])
        decoded = comp.decode(codes)
        hf_decoded = hf.audio_encoder.decode(codes[None], [None]).audio_values
        torch.testing.assert_close(decoded, hf_decoded[..., :decoded.shape[-1]], atol=1e-5, rtol=0)
        emb = comp.encoder(wav)
        torch.testing.assert_close(emb, hf.audio_encoder.encoder(wav), atol=1e-5, rtol=0)
        # AudioCraft's default 'constant' padding would not reproduce HF's encoder
        pkg = loaders.load_compression_model_ckpt(str(out))
        cfg = OmegaConf.create(pkg['xp.cfg'])
        cfg.seanet.pad_mode = 'constant'
        constant = builders.get_compression_model(cfg)
        constant.load_state_dict(pkg['best_state'])
        assert (constant.encoder(wav) - emb).abs().max() > 1e-4


def test_melody_lm_matches(hf_melody_dir, tmp_path):
    """Melody: prepend conditioning [chroma, text, codes], no cross-attention.

    The LM is built here with only the text conditioner (the full build with demucs is in test_melody_base.py) and
    the chroma condition tensor is projected with the converted `self_wav.output_proj` weights. Chroma
    *extraction* (HF feature extractor vs AudioCraft's demucs + ChromaExtractor) is not compared.
    """
    from audiocraft.models import builders, loaders
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft_lora.hf_convert import import_hf, load_hf_musicgen
    from omegaconf import OmegaConf
    hf = load_hf_musicgen(hf_melody_dir).model
    out = import_hf(hf_melody_dir, tmp_path / 'ac')
    pkg = loaders.load_lm_model_ckpt(str(out))
    cfg = OmegaConf.create(pkg['xp.cfg'])
    assert cfg.conditioners.self_wav.model == 'chroma_stem' and list(cfg.fuser.prepend) == ['self_wav', 'description']
    assert not cfg.transformer_lm.cross_attention
    del cfg.conditioners['self_wav']
    lm = builders.get_lm_model(cfg).eval()
    state = dict(pkg['best_state'])
    chroma_w = state.pop('condition_provider.conditioners.self_wav.output_proj.weight')
    chroma_b = state.pop('condition_provider.conditioners.self_wav.output_proj.bias')
    window = state.pop('condition_provider.conditioners.self_wav.chroma.spec.window')
    assert torch.equal(window, torch.hann_window(window.numel()))  # the extractor's STFT window buffer
    lm.load_state_dict(state)  # strict: every other weight has its place

    B, K, T = 2, lm.num_codebooks, 10
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, lm.card, (B, K, T), generator=g)
    chroma = torch.rand(B, hf.config.chroma_length, hf.config.num_chroma, generator=g)
    attributes = [ConditioningAttributes(text={'description': t}) for t in TEXTS]
    with torch.no_grad():
        tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        tensors['self_wav'] = (torch.nn.functional.linear(chroma, chroma_w, chroma_b), torch.ones(B, chroma.shape[1]))
        sequence, _, _ = lm.pattern_provider.get_pattern(T).build_pattern_sequence(
            codes, lm.special_token_id, keep_only_valid_steps=True)
        ac_raw = lm(sequence, [], condition_tensors=tensors)
    tokenizer = lm.condition_provider.conditioners['description'].t5_tokenizer
    text_inputs = tokenizer(TEXTS, return_tensors='pt', padding=True)
    ref = hf_logits(hf, sequence, text_inputs, input_features=chroma)
    torch.testing.assert_close(ac_raw, ref, atol=TOL, rtol=0)
    # the chroma is really used
    ref2 = hf_logits(hf, sequence, text_inputs, input_features=1.0 - chroma)
    assert (ref2 - ac_raw).abs().max() > 1e-3
