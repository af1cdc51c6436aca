"""The full training state for resuming: what a later attempt needs to continue as if never stopped.

A state directory holds the trainable weights (fp32, the network's own state dict), the optimizer and
scheduler state, the random states of python/numpy/torch (per rank), and `progress.json` (step, epoch,
position in the epoch's batch list, loss history, the run's seed and length). `progress.json` is
written last, so a directory without it is incomplete and refused.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.core.failures import JobFailure, Reason

PROGRESS_FILE = "progress.json"
NETWORK_FILE = "network.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FORMAT = 1


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


@dataclass
class Progress:
    step: int  # optimizer updates done
    epoch: int  # the epoch in progress (1-based)
    batch_in_epoch: int  # batches of that epoch already consumed by this rank
    total_steps: int
    seed: int
    world_size: int
    loss_history: list[float] = field(default_factory=list)
    session_id: int = 0
    training_started_at: float = 0.0
    format: int = STATE_FORMAT


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(state_dir: str, *, network_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler: Any, progress: Progress, rank: int = 0, write_shared: bool = True) -> None:
    """Write this rank's RNG state, and (on the writing rank) everything shared by all ranks."""
    os.makedirs(state_dir, exist_ok=True)
    torch.save(capture_rng(), os.path.join(state_dir, rng_file(rank)))
    if not write_shared:
        return
    torch.save({k: v.detach().to("cpu").clone() for k, v in network_state.items()}, os.path.join(state_dir, NETWORK_FILE))
    torch.save(optimizer.state_dict(), os.path.join(state_dir, OPTIMIZER_FILE))
    torch.save(scheduler.state_dict(), os.path.join(state_dir, SCHEDULER_FILE))
    tmp = os.path.join(state_dir, PROGRESS_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(asdict(progress), fh)
    os.replace(tmp, os.path.join(state_dir, PROGRESS_FILE))


def read_progress(state_dir: str) -> Progress:
    path = os.path.join(state_dir, PROGRESS_FILE)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise JobFailure(Reason.INTERNAL, f"checkpoint {state_dir} is incomplete (no {PROGRESS_FILE})") from None
    if data.get("format") != STATE_FORMAT:
        raise JobFailure(Reason.INTERNAL, f"checkpoint {state_dir} has state format {data.get('format')}; "
                         f"this trainer reads format {STATE_FORMAT}")
    return Progress(**data)


def load_training_state(state_dir: str, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        rank: int = 0) -> Progress:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns where to continue."""
    progress = read_progress(state_dir)
    weights = torch.load(os.path.join(state_dir, NETWORK_FILE), map_location="cpu", weights_only=True)
    missing, unexpected = network.load_training_weights(weights)
    if unexpected or missing:
        raise JobFailure(Reason.INTERNAL, f"checkpoint {state_dir} does not match the network "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); was the spec changed?")
    optimizer.load_state_dict(torch.load(os.path.join(state_dir, OPTIMIZER_FILE), map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(state_dir, SCHEDULER_FILE), map_location="cpu", weights_only=False))
    rng_path = os.path.join(state_dir, rng_file(rank))
    if os.path.exists(rng_path):
        restore_rng(torch.load(rng_path, map_location="cpu", weights_only=False))
    return progress
