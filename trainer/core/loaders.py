"""Which tools load which adapter files: the one loader-support table, and the job warnings made from it.

Torch-free (the service runs it at submit and `:validate`). Each row is one algo or option Lathe
trains; a tool listed in `gaps` does not apply such a file as it was trained, for the reason given,
read from that tool's loader code (cited in `SOURCES`). docs/spec.md shows `markdown_table()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOOLS = ("diffusers", "ComfyUI", "A1111/Forge")
# Where each tool's loader lives (what the rows were read from).
SOURCES = {
    "diffusers": "diffusers `loaders/lora_pipeline.py` (`lora_state_dict`) → `loaders/lora_conversion_utils.py` "
                 "(`_convert_non_diffusers_lora_to_diffusers`)",
    "ComfyUI": "ComfyUI `comfy/lora.py` (`load_lora`, `model_lora_keys_*`) → `comfy/weight_adapter/{lora,loha,lokr,"
               "glora,oft,boft}.py`",
    "A1111/Forge": "stable-diffusion-webui `extensions-builtin/Lora/networks.py` → `network_{lora,hada,lokr,full,ia3,"
                   "glora,norm,oft}.py`, `lyco_helpers.py`",
}
# Presets whose networks include 3x3 convolutions (trainer.models.network.PRESETS, conv=True).
CONV_PRESETS = frozenset({"full", "unet-convblock-only"})


def _diffusers_refuses(keys: str) -> str:
    # Its SD/SDXL loader converts `lora_down`/`lora_up`/`alpha` (and `dora_scale`) keys only and raises
    # "The following keys have not been correctly renamed" on any other.
    return f"refuses the whole file on its {keys} keys"


@dataclass(frozen=True)
class Row:
    feature: str  # what the row is about, as the table shows it
    path: str  # the spec field a warning points at
    applies: Callable[[Any], bool]  # NetworkSpec → whether a job's files hold this
    gaps: dict[str, str] = field(default_factory=dict)  # tool → why it does not load the file as trained
    loads_note: str = ""  # how the tools that load it read it, where worth saying


def _lycoris(net) -> bool:
    return net.module == "lycoris.kohya"


def _has_3x3(net) -> bool:
    return net.preset in CONV_PRESETS and net.conv_dim != 0


def _algo(*names: str) -> Callable[[Any], bool]:
    return lambda net: _lycoris(net) and net.algo in names


ROWS: tuple[Row, ...] = (
    Row("lora, locon (either module; 1x1 and 3x3 convs; text encoders)", "network.algo",
        lambda net: not _lycoris(net) or net.algo in ("lora", "locon") and not (net.use_tucker and _has_3x3(net)),
        loads_note="ΔW = up·down·alpha/rank"),
    Row("lora, locon + use_tucker (`lora_mid` on 3x3 convs)", "network.use_tucker",
        lambda net: _algo("lora", "locon")(net) and net.use_tucker and _has_3x3(net),
        gaps={"diffusers": _diffusers_refuses("`lora_mid`")},
        loads_note="`lora_mid` as a Tucker core (ComfyUI `weight_adapter/lora.py`, A1111 `lyco_helpers.rebuild_cp_decomposition`)"),
    Row("dylora", "network.algo", _algo("dylora"),
        loads_note="read as LoRA; Lathe writes alpha × block_size so that the full rank applies what training applied"),
    Row("loha (± use_tucker)", "network.algo", _algo("loha"),
        gaps={"diffusers": _diffusers_refuses("`hada_*`")},
        loads_note="(w1a·w1b)⊙(w2a·w2b)·alpha/rank, `hada_t1`/`hada_t2` as Tucker cores"),
    Row("lokr (factor, decompose_both, use_tucker, use_scalar)", "network.algo", _algo("lokr"),
        gaps={"diffusers": _diffusers_refuses("`lokr_*`")},
        loads_note="kron(w1, w2)·alpha/rank (scale 1 when both halves are full); Lathe writes Tucker 3x3 conv "
                   "layers as plain `lokr_w2_a`·`lokr_w2_b` (ComfyUI's `torch.kron` cannot take its own Tucker rebuild)"),
    Row("full", "network.algo", _algo("full"),
        gaps={"diffusers": _diffusers_refuses("`diff`, `diff_b`")},
        loads_note="ΔW = `diff`, Δb = `diff_b` (ComfyUI `comfy/lora.py`, A1111 `network_full.py`)"),
    Row("ia3", "network.algo", _algo("ia3"),
        gaps={"diffusers": _diffusers_refuses("`weight`, `on_input`"),
              "ComfyUI": "has no IA3 loader: every key is logged \"lora key not loaded\" and dropped"},
        loads_note="W·(1 + weight) per output (or input) channel (A1111 `network_ia3.py`)"),
    Row("glora", "network.algo", _algo("glora"),
        gaps={"diffusers": _diffusers_refuses("`a1`, `a2`, `b1`, `b2`")},
        loads_note="ComfyUI `weight_adapter/glora.py`, A1111 `network_glora.py`"),
    Row("boft", "network.algo", _algo("boft"),
        gaps={"diffusers": _diffusers_refuses("`oft_blocks`"),
              "A1111/Forge": "reads `oft_blocks` as sd-scripts' 3-D OFT blocks; BOFT's are 4-D butterfly stages, "
                             "which it does not apply as trained"},
        loads_note="ComfyUI `weight_adapter/boft.py` (4-D `oft_blocks`)"),
    Row("diag-oft", "network.algo", _algo("diag-oft"),
        gaps={"diffusers": _diffusers_refuses("`oft_blocks`"),
              "A1111/Forge": "reads `oft_blocks` as sd-scripts' OFT, whose constraint alpha·out_dim is 0 for "
                             "LyCORIS' unconstrained alpha 0: the rotation is clamped away and nothing is applied"},
        loads_note="ComfyUI `weight_adapter/oft.py` (3-D `oft_blocks`, alpha 0 = no constraint)"),
    Row("train_norm (`w_norm`, `b_norm`)", "network.train_norm", lambda net: _lycoris(net) and net.train_norm,
        gaps={"diffusers": _diffusers_refuses("`w_norm`, `b_norm`")},
        loads_note="added to the norm's weight and bias (ComfyUI `comfy/lora.py`, A1111 `network_norm.py`)"),
)


def loader_gaps(net) -> list[tuple[str, str]]:
    """(spec path, message) for each tool that will not load this network's files as trained."""
    out = []
    for row in ROWS:
        if not row.gaps or not row.applies(net):
            continue
        missing = [tool for tool in TOOLS if tool in row.gaps]
        loaders = [tool for tool in TOOLS if tool not in row.gaps]
        reasons = "; ".join(f"{tool} {row.gaps[tool]}" for tool in missing)
        loads = f"; it loads in {', '.join(loaders)}" if loaders else ""
        out.append((row.path, f"{row.feature}: the adapter file will not load as trained in {' or '.join(missing)} "
                              f"({reasons}){loads} (loader-support table in docs/spec.md)"))
    return out


def markdown_table() -> str:
    """The loader-support table as docs/spec.md shows it."""
    lines = ["| algo / option | " + " | ".join(TOOLS) + " | how the loaders read it |",
             "|---|" + "---|" * len(TOOLS) + "---|"]
    for row in ROWS:
        cells = [f"no: {row.gaps[tool]}" if tool in row.gaps else "yes" for tool in TOOLS]
        lines.append(f"| {row.feature} | " + " | ".join(cells) + f" | {row.loads_note} |")
    return "\n".join(lines)
