"""Comparison grids, A1111's XYZ plot: prompts rendered over adapters ("saves") × weights × seeds.

Each adapter is applied to the loaded base in memory at each weight: the ΔW of every layer is the
one the merge folds in (`trainer.models.merge`, LyCORIS' forward-pass scale), added to the module's weight
and taken off again after the cell, so a cell at weight w renders what the base merged at ratio w
renders. Images go through the sampling code of training (`trainer.sampling.samples`). Output: the single
images, one labelled PNG grid per prompt (Pillow) and `grid.json` saying what each cell is.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from trainer.models import keys
from trainer.core.failures import JobFailure, Reason
from trainer.models.merge import check_layer_fits, mismatch, parse_adapter_file
from trainer.shrink.adapter_layers import materialize

log = logging.getLogger("lathe.grid")

GRID_JSON = "grid.json"
AXIS_TITLES = {"saves": "save", "weight": "weight", "seed": "seed"}


@dataclass(frozen=True)
class GridAdapter:
    path: str  # local file
    label: str  # the axis label: an epoch/step save's file name, or the user's label
    source: str  # how it is named in grid.json (its URI)


@dataclass(frozen=True)
class Axes:
    x: str
    y: str
    weights: list[float]
    seeds: list[int]


def _modules(parts: Any) -> dict[str, torch.nn.Module]:
    """sd-scripts layer name → module, for every Linear/Conv2d of the UNet and text encoders."""
    out: dict[str, torch.nn.Module] = {}
    unet_config = dict(parts.unet.config)
    for path, m in parts.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out[keys.sd_scripts_unet_name(path, parts.arch, unet_config=unet_config)] = m
    for index, te in enumerate(parts.text_encoders):
        for path, m in te.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                out[keys.sd_scripts_text_encoder_name(path, parts.arch, index)] = m
    return out


class AdapterDeltas:
    """An adapter file as (module, ΔW, Δb) per layer, checked against the loaded base."""

    def __init__(self, parts: Any, adapter: GridAdapter, modules: dict[str, torch.nn.Module]) -> None:
        source = adapter.source
        parsed = parse_adapter_file(adapter.path, source, "such layers cannot be applied")
        self.items: list[tuple[torch.nn.Module, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
        for layer in parsed.layers:
            module = modules.get(layer.name)
            check_layer_fits(layer, None if module is None else tuple(module.weight.shape), parts.arch, source)
            delta = materialize(layer.structure()).reshape(module.weight.shape)
            if not torch.isfinite(delta).all():
                raise mismatch(source, layer.name, "its weights are not finite (NaN/inf)")
            bias = layer.extra.get("diff_b")
            self.items.append((module, delta, None if bias is None else bias.reshape(-1), None))
        for name, kind in parsed.passthrough_kinds.items():
            module = modules.get(name)
            if module is None:
                raise mismatch(source, name, "the base model has no such layer")
            if kind == "ia3":
                w = parsed.passthrough[f"{name}.weight"].to(torch.float32).flatten()
                on_input = f"{name}.on_input" in parsed.passthrough and bool(parsed.passthrough[f"{name}.on_input"].item())
                shape = [1] * module.weight.dim()
                shape[1 if on_input else 0] = w.numel()
                self.items.append((module, None, None, w.reshape(shape)))
            elif kind == "diff_b" and not any(layer.name == name for layer in parsed.layers):
                self.items.append((module, None, parsed.passthrough[f"{name}.diff_b"].reshape(-1), None))
            elif kind != "diff_b":
                raise mismatch(source, name, f"'{kind}' layers cannot be applied to a grid")

    @contextlib.contextmanager
    def applied(self, weight: float) -> Iterator[None]:
        saved = []
        try:
            with torch.no_grad():
                for module, delta, bias, ia3 in self.items:
                    saved.append((module, module.weight.detach().clone(),
                                  None if module.bias is None else module.bias.detach().clone()))
                    w = module.weight
                    if delta is not None:
                        w.copy_((w.float() + weight * delta.to(w.device)).to(w.dtype))
                    if ia3 is not None:
                        w.copy_((w.float() * (1 + weight * ia3.to(w.device))).to(w.dtype))
                    if bias is not None and module.bias is not None:
                        b = module.bias
                        b.copy_((b.float() + weight * bias.to(b.device, torch.float32)).to(b.dtype))
            yield
        finally:
            with torch.no_grad():
                for module, weight_, bias_ in reversed(saved):
                    module.weight.copy_(weight_)
                    if bias_ is not None:
                        module.bias.copy_(bias_)


def _values(axis: str, adapters: list[GridAdapter], axes: Axes) -> list[Any]:
    return {"saves": list(range(len(adapters))), "weight": axes.weights, "seed": axes.seeds}[axis]


def _label(axis: str, value: Any, adapters: list[GridAdapter]) -> str:
    if axis == "saves":
        return adapters[value].label
    return f"{value:g}" if axis == "weight" else str(value)


@torch.no_grad()
def render_grid(parts: Any, adapters: list[GridAdapter], prompts: list[str], axes: Axes, sampler: str,
                out_dir: str, *, clip_skip: int | None = None, base_seed: int = 0) -> dict[str, Any]:
    """Render every cell, compose one grid PNG per prompt; returns grid.json's content (also written)."""
    from trainer.sampling.samples import pipeline_for, render_image
    from trainer.core.spec import parse_sample_prompt

    if not adapters:
        raise JobFailure(Reason.SPEC_INVALID, "grid: no adapters to compare")
    if len(adapters) > 1 and "saves" not in (axes.x, axes.y):
        raise JobFailure(Reason.SPEC_INVALID, f"grid: {len(adapters)} adapters but saves is not an axis")
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    modules = _modules(parts)
    deltas = [AdapterDeltas(parts, a, modules) for a in adapters]
    xs, ys = _values(axes.x, adapters, axes), _values(axes.y, adapters, axes)
    record: dict[str, Any] = {
        "x": {"axis": axes.x, "labels": [_label(axes.x, v, adapters) for v in xs]},
        "y": {"axis": axes.y, "labels": [_label(axes.y, v, adapters) for v in ys]},
        "sampler": sampler,
        "adapters": [{"label": a.label, "uri": a.source} for a in adapters],
        "prompts": [],
    }
    with pipeline_for(parts, sampler) as pipe:
        for p_index, line in enumerate(prompts):
            opts = parse_sample_prompt(line)
            cells: list[dict[str, Any]] = []
            images: dict[tuple[int, int], Any] = {}
            for yi, yv in enumerate(ys):
                for xi, xv in enumerate(xs):
                    pick = {axes.x: xv, axes.y: yv}
                    save = pick.get("saves", 0)
                    weight = pick.get("weight", axes.weights[0])
                    seed = pick.get("seed", axes.seeds[0] if axes.seeds else
                                    opts["seed"] if opts["seed"] is not None else base_seed + p_index)
                    with deltas[save].applied(weight):
                        image = render_image(pipe, parts, opts, seed, clip_skip)
                    name = f"cells/{p_index}-{yi}-{xi}.png"
                    image.save(out / name)
                    images[(yi, xi)] = image
                    cells.append({"row": yi, "column": xi, "file": name, "adapter": adapters[save].source,
                                  "save": adapters[save].label, "weight": weight, "seed": seed})
                    log.info("grid cell prompt %d row %d column %d: %s w=%g seed=%d", p_index, yi, xi,
                             adapters[save].label, weight, seed)
            grid_name = f"grid-{p_index}.png"
            compose(images, len(ys), len(xs), record["x"]["labels"], record["y"]["labels"],
                    AXIS_TITLES[axes.x], AXIS_TITLES[axes.y], opts["prompt"]).save(out / grid_name)
            record["prompts"].append({"prompt": opts["prompt"], "negative_prompt": opts["negative_prompt"],
                                      "steps": opts["steps"], "scale": opts["scale"], "width": opts["width"],
                                      "height": opts["height"], "grid": grid_name, "cells": cells})
    (out / GRID_JSON).write_text(json.dumps(record, indent=2))
    return record


def compose(images: dict[tuple[int, int], Any], rows: int, columns: int, x_labels: list[str], y_labels: list[str],
            x_title: str, y_title: str, caption: str) -> Any:
    """The cells in a table: column labels on top (the x axis), row labels on the left (the y axis),
    the axis names in the corner and the prompt above."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell_w = max(im.width for im in images.values())
    cell_h = max(im.height for im in images.values())
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    line_h = max(size("Ag")[1], 10) + 6
    corner = f"{y_title} \\ {x_title}"
    left_w = max(size(t)[0] for t in [*y_labels, corner]) + 12
    top_h = 2 * line_h
    slot_w = max(cell_w, max(size(t)[0] for t in x_labels) + 8)  # a long label widens its column
    width = left_w + columns * slot_w
    canvas = Image.new("RGB", (max(width, size(caption)[0] + 12), top_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 3), caption, fill="black", font=font)
    draw.text((6, line_h + 3), corner, fill="dimgray", font=font)
    for xi, label in enumerate(x_labels):
        w, _ = size(label)
        draw.text((left_w + xi * slot_w + (slot_w - w) // 2, line_h + 3), label, fill="black", font=font)
    for yi, label in enumerate(y_labels):
        _, h = size(label)
        draw.text((6, top_h + yi * cell_h + (cell_h - h) // 2), label, fill="black", font=font)
    for (yi, xi), image in images.items():
        canvas.paste(image, (left_w + xi * slot_w + (slot_w - image.width) // 2, top_h + yi * cell_h))
    return canvas
