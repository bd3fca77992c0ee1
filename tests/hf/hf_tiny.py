"""Tiny random Hugging Face MusicGen folders (text, stereo, melody) built offline, and logits helpers.

Importable as `hf_tiny` from the tests of this folder (a unique name: `conftest` is taken by tests/conftest.py).
"""
from pathlib import Path
import typing as tp

import torch

WORDS = ['hip', 'hop', '808', 'beat', 'with', 'trap', 'drums', 'sub', 'bass', 'heavy', 'lofi', 'piano', 'jazz',
         'chill', 'guitar', 'rock', 'loud', 'soft']
# same token count (HF masks padded text out of cross-attention, AudioCraft only zeroes it)
TEXTS = ['hip hop 808 beat with trap drums', 'lofi piano jazz chill guitar soft rock']


def tiny_tokenizer():
    from transformers import T5Tokenizer
    vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('▁', -2.0)]
    vocab += [(f'▁{w}', -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in 'abcdefghijklmnopqrstuvwxyz0123456789']
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_configs(stereo: bool = False, melody: bool = False, decoder_hidden: int = 32):
    from transformers import EncodecConfig, T5Config
    text = T5Config(vocab_size=len(tiny_tokenizer()), d_model=512, d_kv=16, d_ff=32, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    audio = EncodecConfig(target_bandwidths=[8.0], sampling_rate=32000, audio_channels=1, normalize=False,
                          chunk_length_s=None, overlap=None, num_filters=4, num_residual_layers=1,
                          upsampling_ratios=[8, 5, 4], codebook_size=64, hidden_size=16, num_lstm_layers=1,
                          use_causal_conv=False, use_conv_shortcut=False, pad_mode='reflect')
    num_codebooks = 8 if stereo else 4
    decoder_kwargs = dict(vocab_size=64, max_position_embeddings=512, num_hidden_layers=2, ffn_dim=64,
                          num_attention_heads=2, hidden_size=decoder_hidden, dropout=0.0, num_codebooks=num_codebooks,
                          audio_channels=2 if stereo else 1, pad_token_id=64, bos_token_id=64)
    return text, audio, decoder_kwargs


def build_hf_musicgen(folder: Path, stereo: bool = False, melody: bool = False, decoder_hidden: int = 32,
                      seed: int = 0, t5_seed: int = 123) -> Path:
    """Save a tiny random MusicGen (or melody) with `save_pretrained`, plus its T5 tokenizer, to `folder`."""
    from transformers import (MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration, T5EncoderModel)
    text, audio, decoder_kwargs = tiny_configs(stereo, melody, decoder_hidden)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if melody:
            config = MusicgenMelodyConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                                          decoder=MusicgenMelodyDecoderConfig(**decoder_kwargs).to_dict(),
                                          num_chroma=12, chroma_length=16)
            model = MusicgenMelodyForConditionalGeneration(config)
        else:
            config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                                    decoder=MusicgenDecoderConfig(**decoder_kwargs).to_dict())
            model = MusicgenForConditionalGeneration(config)
        # random init leaves layer norms at (1, 0) and codebooks at their init: perturb everything a bit so a
        # wrong mapping (swapped norms, q/k order) can't go unnoticed
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(('layer_norm.weight', 'layer_norm.bias')):
                    param.add_(0.1 * torch.randn_like(param))
                elif param.dim() == 2 and not name.startswith(('text_encoder', 'audio_encoder')):
                    param.normal_(0, param.shape[1] ** -0.5)  # conditioning must visibly change the logits
            for layer in model.audio_encoder.quantizer.layers:
                layer.codebook.embed.normal_()
        # one T5 for all tiny models (as all MusicGens share t5-base): they all register as 't5-small'
        torch.manual_seed(t5_seed)
        model.text_encoder.load_state_dict(T5EncoderModel(text).state_dict())
    # as in the released musicgen-small generation_config.json
    model.generation_config.guidance_scale = 3.0
    model.generation_config.decoder_start_token_id = model.generation_config.pad_token_id = 64
    model.generation_config.bos_token_id = 64
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder




def hf_delay_input(hf_model, codes: torch.Tensor) -> torch.Tensor:
    """HF's own teacher-forcing input for `codes` [B, K, T]: BOS then codes, delayed by `build_delay_pattern_mask`.

    Returns:
        torch.Tensor: [B, K, T + max_delay + 1]
    """
    B, K, T = codes.shape
    bos = hf_model.generation_config.decoder_start_token_id
    ids = torch.cat([torch.full((B, K, 1), bos), codes], dim=-1).reshape(B * K, T + 1)
    channel_k = K // hf_model.config.decoder.audio_channels
    _, pattern = hf_model.decoder.build_delay_pattern_mask(ids, pad_token_id=bos, max_length=T + channel_k)
    return pattern.reshape(B, K, -1)


def hf_logits(hf_model, decoder_input: torch.Tensor, text_inputs, **kwargs) -> torch.Tensor:
    """Logits [B, K, S, card] of an HF MusicGen for a delayed decoder input [B, K, S] and tokenized texts."""
    B, K, S = decoder_input.shape
    with torch.no_grad():
        out = hf_model(input_ids=text_inputs['input_ids'], attention_mask=text_inputs['attention_mask'],
                       decoder_input_ids=decoder_input.reshape(B * K, S), **kwargs)
    logits = out.logits.reshape(B, K, -1, out.logits.shape[-1])
    return logits[:, :, -S:]  # melody: drop the prepended condition positions


def audiocraft_raw_logits(lm, codes: torch.Tensor, texts: tp.Sequence[str]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """AudioCraft LM logits on its own delay-pattern sequence. Returns (sequence [B, K, S], logits [B, K, S, card])."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    attributes = [ConditioningAttributes(text={'description': t}) for t in texts]
    with torch.no_grad():
        tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        sequence, _, _ = lm.pattern_provider.get_pattern(codes.shape[-1]).build_pattern_sequence(
            codes, lm.special_token_id, keep_only_valid_steps=True)
        return sequence, lm(sequence, [], condition_tensors=tensors)
