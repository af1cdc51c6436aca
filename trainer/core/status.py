"""`status.json`: what the trainer reports about one job, torch-free.

The trainer writes it (phase changes, progress, heartbeat, its own terminal state, outputs); the
service reads it and merges it with `job.json` (the phases only the service decides: queued,
cancelled) and the launcher's view. `revision` only grows across attempts: it is the SSE event id.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from trainer.core.failures import Reason

Phase = Literal[
    "queued", "preparing", "training", "shrinking", "merging", "captioning", "rendering", "uploading", "succeeded", "failed", "cancelled"
]
PHASES: tuple[str, ...] = (
    "queued", "preparing", "training", "shrinking", "merging", "captioning", "rendering", "uploading", "succeeded", "failed", "cancelled"
)
TERMINAL_PHASES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class Progress(msgspec.Struct, kw_only=True):
    step: int = 0  # optimizer updates done (after gradient accumulation, as in sd-scripts)
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None  # last step's loss
    avg_loss: float | None = None  # running average (sd-scripts' "avr_loss")
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None


# In the OpenAPI document: every failure reason a client may meet (the table in docs/api.md).
REASON_DOC = ("why the job failed: " + ", ".join(r.value for r in Reason)
              + " (adapter_mismatch: an adapter does not fit its base model, architecture or layer shapes; "
              "model_invalid on a caption job: the tagger folder is not a WD14-format tagger, the message names "
              "the file; dataset_invalid: an image that cannot be decoded, named)")


class ErrorInfo(msgspec.Struct, kw_only=True):
    reason: Annotated[str, msgspec.Meta(description=REASON_DOC)]  # a trainer.core.failures.Reason value
    message: str = ""


class OutputFile(msgspec.Struct, kw_only=True):
    name: str  # file name under the output location
    uri: str
    size: int
    sha256: str
    kind: str = "other"  # adapter | adapter_shrunk | adapter_epoch | adapter_step | sample | plot | config | log | report | metadata


class JobStatus(msgspec.Struct, kw_only=True):
    phase: Phase
    revision: int = 0  # grows by one on every write, across attempts
    attempt: int = 1
    heartbeat_at: float = 0.0  # unix seconds of the last write
    started_at: float = 0.0
    updated_at: float = 0.0
    progress: Progress = msgspec.field(default_factory=Progress)
    error: ErrorInfo | None = None
    outputs: list[OutputFile] = []
    warnings: list[str] = []
