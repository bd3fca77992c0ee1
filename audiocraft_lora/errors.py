"""Errors meant for the user: one clear message naming the file/key and the fix, no traceback needed."""


class UserError(Exception):
    """Bad input or configuration detected before any compute is spent.

    The message must name the offending file, key or value and say how to fix it.
    """


class DataError(UserError):
    """A dataset entry (audio file, manifest line, sidecar json) is unusable."""


class BaseModelError(UserError):
    """The base model can't be found, loaded, or doesn't match an adapter."""


class LoRAConfigError(UserError):
    """The LoRA configuration is invalid (rank, targets, ...)."""


class OutOfMemory(UserError):
    """The GPU ran out of memory in a training step; the message names the memory setting to try next."""
