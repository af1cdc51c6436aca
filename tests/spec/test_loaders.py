"""The loader-support table: the warnings it makes for each algo/option, and docs/spec.md showing it as is."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.core.loaders import markdown_table
from trainer.core.spec import spec_from_obj, warnings_for

DOCS = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def _gaps(**network) -> dict[str, str]:
    spec = spec_from_obj({"version": 1, "model": {"uri": "m"}, "dataset": {"uri": "d"}, "network": network})
    return {w.path: w.message for w in warnings_for(spec) if "will not load" in w.message}


@pytest.mark.parametrize("network, path, missing", [
    ({"algo": "ia3"}, "network.algo", ["diffusers", "ComfyUI"]),
    ({"algo": "loha", "use_tucker": True}, "network.algo", ["diffusers"]),
    ({"algo": "lokr", "use_tucker": True, "decompose_both": True}, "network.algo", ["diffusers"]),
    ({"algo": "full"}, "network.algo", ["diffusers"]),
    ({"algo": "glora"}, "network.algo", ["diffusers"]),
    ({"algo": "boft", "factor": 4}, "network.algo", ["diffusers", "A1111/Forge"]),
    ({"algo": "diag-oft", "factor": 4}, "network.algo", ["diffusers", "A1111/Forge"]),
    ({"algo": "locon", "use_tucker": True}, "network.use_tucker", ["diffusers"]),
    ({"train_norm": True}, "network.train_norm", ["diffusers"]),
])
def test_each_known_gap_is_a_warning_naming_the_tools(network, path, missing):
    gaps = _gaps(**network)
    assert list(gaps) == [path]
    named = gaps[path].split("will not load as trained in ")[1].split(" (")[0]  # "X or Y (reasons)…"
    assert [tool for tool in ("diffusers", "ComfyUI", "A1111/Forge") if tool in named] == missing


@pytest.mark.parametrize("network", [
    {},
    {"algo": "locon", "conv_dim": 8},
    {"algo": "dylora", "dim": 8},
    {"module": "networks.lora", "conv_dim": 4},
    {"module": "networks.lora", "use_tucker": True},  # networks.lora ignores it: no lora_mid is written
    {"algo": "locon", "use_tucker": True, "preset": "attn-mlp"},  # no 3x3 conv, so no lora_mid
    {"algo": "locon", "use_tucker": True, "conv_dim": 0},
])
def test_files_every_tool_loads_get_no_loader_warning(network):
    assert _gaps(**network) == {}


def test_docs_show_the_table_the_warnings_come_from():
    assert markdown_table() in DOCS.read_text(encoding="utf-8")
