"""audiocraft-lora: AudioCraft-native LoRA fine-tuning for MusicGen."""

__version__ = '0.1.0'
