"""Hugging Face transformers <-> AudioCraft interop, one module per job.

- `lm_map`: MusicGen decoder weights and config (HF `MusicgenForConditionalGeneration` <-> AudioCraft `LMModel`).
- `encodec_map`: HF `EncodecModel` -> AudioCraft SEANet + RVQ `EncodecModel` package.
- `t5_local`: the folder's own T5 encoder + tokenizer, made loadable offline by AudioCraft's stock `T5Conditioner`.
- `peft_map`: our canonical LoRA tensors -> a Hugging Face PEFT adapter folder.

`audiocraft_lora.hf_convert` is the entry point that ties them together.
"""
