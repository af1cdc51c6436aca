"""Exact SVD rank reduction of LoRA / LyCORIS adapters: pure functions + a thin CLI.

`shrink_file(...)` is the job phase API; `python -m trainer shrink …` (trainer.shrink.cli) the tool.
Importing this package stays light (no torch) so the CLI can parse arguments before loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.core.shrink_errors import NothingToShrink, ShrinkError
from .report import LayerRow, ShrinkReport, ShrinkTotals

if TYPE_CHECKING:
    from .pipeline import shrink_file
else:

    def shrink_file(*args, **kwargs):
        """See `trainer.shrink.pipeline.shrink_file`."""
        from .pipeline import shrink_file as _shrink_file

        return _shrink_file(*args, **kwargs)


__all__ = ["LayerRow", "NothingToShrink", "ShrinkError", "ShrinkReport", "ShrinkTotals", "shrink_file"]
