"""What every phase of one attempt shares: the job directory, the output store, local folders, the rank.

`RunContext` is made once in `trainer.job.run.run_job` and reaches every kind's phases through `Job.ctx`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.jobdir import JobDir
from trainer.core.spec import JobSpec
from trainer.core.status import OutputFile
from trainer.core.storage import Store


@dataclass
class RunContext:
    jobdir: JobDir
    out: Store                 # the output location
    work_dir: Path
    cache_dir: Path
    attempt: int
    rank: int = 0
    world_size: int = 1
    stop_signal: str | None = None  # set by SIGTERM
    published: dict[str, OutputFile] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, spec: JobSpec) -> int:
        """The spec's seed, or with none given one derived from the job directory, so every attempt
        (and every rank) agrees; metadata.json records it."""
        if spec.training.seed is not None:
            return spec.training.seed
        return int(hashlib.sha256(self.jobdir.uri.encode()).hexdigest()[:8], 16)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
