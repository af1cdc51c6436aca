"""The one error type of the shrink component."""

from __future__ import annotations


class ShrinkError(ValueError):
    """Bad input for a shrink: the message names the file/key/option and says what to do."""


class NothingToShrink(ShrinkError):
    """The adapter holds no layer that can become a low-rank LoRA (e.g. only IA3 / norm tensors).

    A job's shrinking phase may treat this as "skip", a user running the CLI as an error.
    """
