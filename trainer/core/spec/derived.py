"""Values derived from a spec: the run's length, warmup, and which models are trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainer.core.spec.common import DEFAULT_MAX_TRAIN_STEPS
from trainer.core.spec.network import COMPILE_CLEAN_ALGOS

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec
    from trainer.core.spec.network import NetworkSpec


def total_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    """Optimizer updates for the run: epochs win over steps; 1600 when neither is given (sd-scripts)."""
    if spec.training.max_train_epochs is not None:
        return spec.training.max_train_epochs * max(1, steps_per_epoch)
    return spec.training.max_train_steps or DEFAULT_MAX_TRAIN_STEPS


def warmup_steps(spec: JobSpec, total: int) -> int:
    w = spec.scheduler.warmup_steps
    return int(round(w * total)) if 0 < w < 1 else int(w)


def train_text_encoder(spec: JobSpec) -> bool:
    """Whether the text encoder(s) are trained (sd-scripts: unless --network_train_unet_only)."""
    return not spec.network.train_unet_only


def train_unet(spec: JobSpec) -> bool:
    return not spec.network.train_text_encoder_only


def compiles_cleanly(network: NetworkSpec) -> bool:
    """Whether the adapter's forward traces into one graph (the tests check these with fullgraph=True);
    the others (LoHa, LoKr, …) break the graph, and "auto" leaves them eager."""
    return network.module == "networks.lora" or network.algo in COMPILE_CLEAN_ALGOS


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    fullgraph: bool  # the adapter traces into one graph (tests hold it to that)
    warning: str | None = None


def compile_choice(spec: JobSpec, *, cuda: bool) -> CompileChoice:
    """What `precision.torch_compile` means for this job on this machine: "auto" compiles on CUDA for the
    adapters that trace into one graph, never on CPU (where compiling costs more than it saves)."""
    setting, clean = spec.precision.torch_compile, compiles_cleanly(spec.network)
    if setting is False or (setting == "auto" and not cuda):
        return CompileChoice(False, False)
    if setting == "auto" and not clean:
        return CompileChoice(False, False, f"precision.torch_compile 'auto': network.algo '{spec.network.algo}' does "
                             "not compile into one graph, so the step runs eager (set torch_compile true to compile "
                             "it with graph breaks)")
    return CompileChoice(True, clean)
