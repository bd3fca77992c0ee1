"""audiocraft-lora: LoRA fine-tuning of MusicGen inside AudioCraft. See README.md."""
__version__ = '0.1.0'


def __getattr__(name):  # lazy, so `audiocraft-lora --help` doesn't import torch
    if name == 'load_musicgen':
        from .api import load_musicgen
        return load_musicgen
    raise AttributeError(f"module 'audiocraft_lora' has no attribute {name!r}")
