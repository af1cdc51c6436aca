"""Header metadata of the shrunk file: sd-scripts' resize updates, hashes, and our report."""

from __future__ import annotations

import json

from torch import Tensor

from trainer.models.adapter_file import modelspec_sha256

from .report import ShrinkReport

REPORT_KEY = "lathe_shrink_report"


def shrunk_metadata(
    metadata: dict[str, str],
    tensors: dict[str, Tensor],
    report: ShrinkReport,
    *,
    old_dim: str,
    ranks: list[int],
    alphas: list[float],
    converted_lycoris: bool,
    conv_ranks: list[int],
) -> dict[str, str]:
    """Input metadata updated as sd-scripts' resize_lora does, plus the shrink report (the writer,
    `write_hashed`, adds the recomputed sshs hashes)."""
    out = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != REPORT_KEY}
    comment = metadata.get("ss_training_comment", "")
    if report.rule == "rank":
        out["ss_training_comment"] = f"dimension is resized from {old_dim} to {report.rank}; {comment}"
        out["ss_network_dim"] = str(report.rank)
        out["ss_network_alpha"] = _uniform(alphas)
    else:
        how = f"{report.method}: {report.param}" if report.rule == "method" else f"recipe {report.recipe}"
        out["ss_training_comment"] = f"Dynamic resize with {how} from {old_dim}; {comment}"
        out["ss_network_dim"] = "Dynamic"
        out["ss_network_alpha"] = "Dynamic"
    if converted_lycoris:
        # The file is now a plain LoRA/LoCon: say so to tools that read the module name.
        out["ss_network_module"] = "networks.lora"
        args = {}
        if conv_ranks:
            args = {"conv_dim": _uniform(conv_ranks), "conv_alpha": "Dynamic" if report.rule != "rank" else _uniform(alphas)}
        out["ss_network_args"] = json.dumps(args)
    if "modelspec.hash_sha256" in out:
        out["modelspec.hash_sha256"] = modelspec_sha256(tensors)
    out[REPORT_KEY] = report.header_json()
    return out


def _uniform(values: list[float] | list[int]) -> str:
    distinct = set(values)
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct.pop()
    return str(value)
