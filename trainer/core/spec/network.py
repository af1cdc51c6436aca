"""The `network` section: module, algorithm and LyCORIS / networks.lora options, and their checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta

from trainer.core.loaders import loader_gaps
from trainer.core.spec.common import Fraction, NonNegInt, PositiveInt, Uri, _Base
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

NetworkModule = Literal["lycoris.kohya", "networks.lora"]
Algo = Literal["lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "glora", "boft", "diag-oft"]
# Algos whose adapters have no low-rank ΔW = up·down form the shrink phase could reduce.
UNSHRINKABLE_ALGOS = frozenset({"ia3", "glora", "boft", "diag-oft"})
# LyCORIS algorithms whose forward compiles with fullgraph=True (networks.lora does too).
COMPILE_CLEAN_ALGOS = ("lora", "locon")
Preset = Literal[
    "full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only"
]

# block_dims / block_alphas lengths of sd-scripts' networks.lora (checked against networks/lora.py):
# SD1/2: NUM_OF_BLOCKS * 2 + NUM_OF_MID_BLOCKS = 12 + 1 + 12; SDXL: 1 (base) + 9 IN + 3 MID + 9 OUT + 1 (out).
BLOCK_COUNTS: dict[str, int] = {"sd1": 25, "sd2": 25, "sdxl": 23}


class NetworkSpec(_Base):
    """What is trained (`--network_module`, `--network_dim/alpha`, `--network_args …`)."""

    module: NetworkModule = "lycoris.kohya"
    algo: Algo = "lora"
    preset: Preset = "full"
    dim: PositiveInt = 4  # network_dim (rank)
    alpha: Annotated[float, Meta(gt=0.0)] = 1.0  # scale = alpha / dim
    # conv (ResNet 3x3) layers. None means the module's own default, as in sd-scripts: lycoris.kohya trains
    # them at rank `dim` (when the preset includes convs), networks.lora leaves them out.
    conv_dim: NonNegInt | None = None
    conv_alpha: Annotated[float, Meta(gt=0.0)] | None = None  # None: lycoris.kohya → alpha; networks.lora → 1.0
    # Neuron dropout: --network_dropout for networks.lora, network_args "dropout=" for lycoris.kohya.
    dropout: Fraction | None = None
    rank_dropout: Fraction | None = None
    module_dropout: Fraction | None = None
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout_scale: bool = False
    train_norm: bool = False
    factor: Annotated[int, Meta(ge=-1)] = -1  # LoKr factor (-1: as balanced as possible)
    decompose_both: bool = False  # LoKr: decompose both Kronecker factors
    block_size: PositiveInt = 4  # DyLoRA unit
    block_dims: Annotated[list[PositiveInt], Meta(max_length=64)] | None = None  # networks.lora only: one rank per block
    block_alphas: Annotated[list[Annotated[float, Meta(gt=0.0)]], Meta(max_length=64)] | None = None
    conv_block_dims: Annotated[list[NonNegInt], Meta(max_length=64)] | None = None
    conv_block_alphas: Annotated[list[Annotated[float, Meta(gt=0.0)]], Meta(max_length=64)] | None = None
    weights: Uri | None = None  # --network_weights: continue from an existing adapter file
    train_unet_only: bool = False
    train_text_encoder_only: bool = False


# NetworkSpec fields only lycoris.kohya reads, with their defaults.
_LYCORIS_ONLY_DEFAULTS: dict[str, Any] = {
    "preset": "full", "use_tucker": False, "use_scalar": False, "rank_dropout_scale": False, "train_norm": False,
    "factor": -1, "decompose_both": False, "block_size": 4,
}


def check_network(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, net, arch = out.err, out.warn, spec.network, spec.model.arch
    if net.module == "networks.lora" and net.algo not in ("lora", "locon"):
        err("network.algo", f"networks.lora trains plain LoRA only; for '{net.algo}' use network.module = "
            "'lycoris.kohya'")
    if net.module == "networks.lora":
        lycoris_only = [name for name, default in _LYCORIS_ONLY_DEFAULTS.items() if getattr(net, name) != default]
        for name in lycoris_only:
            warn(f"network.{name}", "is a LyCORIS option; networks.lora ignores it (as sd-scripts does)")
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(net, name)
        if values is None:
            continue
        if net.module != "networks.lora":
            err(f"network.{name}", "is only used by network.module = 'networks.lora' (lycoris.kohya ignores it, "
                "as in sd-scripts); remove it or switch the module")
            continue
        expected = BLOCK_COUNTS[arch]
        if len(values) != expected:
            err(f"network.{name}", f"has {len(values)} values; {arch} with networks.lora needs exactly {expected} "
                "(IN blocks, MID, OUT blocks)")
    if net.block_alphas is not None and net.block_dims is None:
        err("network.block_alphas", "needs network.block_dims")
    if net.conv_block_alphas is not None and net.conv_block_dims is None:
        err("network.conv_block_alphas", "needs network.conv_block_dims")
    if net.train_unet_only and net.train_text_encoder_only:
        err("network.train_text_encoder_only", "cannot be combined with network.train_unet_only: nothing to train")
    if net.alpha > net.dim * 8:
        warn("network.alpha", f"alpha {net.alpha} is far above dim {net.dim}: the update is scaled by {net.alpha / net.dim:g}")
    if net.algo in ("ia3", "full") and net.use_tucker:
        warn("network.use_tucker", f"has no effect with algo '{net.algo}'")
    if net.algo == "lokr" and net.factor == 0:
        err("network.factor", "must be -1 (balanced) or a positive factor")
    for path, message in loader_gaps(net):  # tools that will not load the files (docs/spec.md, loaders)
        warn(path, message)
    return out
