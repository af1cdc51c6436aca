"""`--plot PNG`: rank kept per layer, grouped by block, and the Frobenius energy each layer retains."""

from __future__ import annotations

import re

from .report import ShrinkReport

_BLOCK = re.compile(
    r"^lora_(te\d?)_|^lora_unet_((?:down|up)_blocks_\d+|mid_block|(?:input|output)_blocks_\d+|middle_block)"
)


def block_of(name: str) -> str:
    m = _BLOCK.match(name)
    if not m:
        return "other"
    return m.group(1) or m.group(2)


def plot_report(report: ShrinkReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.layers
    blocks = [block_of(r.name) for r in rows]
    order = list(dict.fromkeys(blocks))
    palette = plt.get_cmap("tab20")
    colors = [palette(order.index(b) % 20) for b in blocks]
    x = range(len(rows))
    fig, (ax_rank, ax_fro) = plt.subplots(2, 1, figsize=(max(8.0, len(rows) / 40), 6.5), sharex=True)
    ax_rank.bar(x, [r.old_rank for r in rows], color="0.85", width=1.0, label="input rank")
    ax_rank.bar(x, [r.new_rank for r in rows], color=colors, width=1.0)
    ax_rank.set_ylabel("rank kept")
    ax_rank.set_yscale("symlog", linthresh=1)
    ax_fro.bar(x, [r.retained_fro for r in rows], color=colors, width=1.0)
    ax_fro.set_ylabel("retained ‖ΔW‖_F")
    ax_fro.set_ylim(0, 1.02)
    # One tick per block, at its first layer.
    starts = [i for i, b in enumerate(blocks) if i == 0 or blocks[i - 1] != b]
    ax_fro.set_xticks(starts, [blocks[i] for i in starts], rotation=60, ha="right", fontsize=7)
    totals = report.totals
    rule = {"rank": f"rank {report.rank}", "method": f"{report.method} {report.param}"}.get(
        report.rule, f"recipe {report.recipe}"
    )
    fig.suptitle(
        f"{rule}: {totals.layers_out}/{totals.layers_in} layers, {totals.bytes_in / 2**20:.1f} → "
        f"{totals.bytes_out / 2**20:.1f} MiB, retained {totals.retained_fro:.3f}",
        fontsize=10,
    )
    ax_rank.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
