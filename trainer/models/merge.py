"""Merging adapters into their base model: a checkpoint in the base's own form.

The base is read and written as it is stored, never through a model class, so a merged checkpoint
keeps every key, dtype and tensor the base had and differs only in the adapted weights:
- a single file (original SGM/LDM key names) gives a single `.safetensors` file with the same keys
  and `modelspec.*` metadata naming its parts (`lathe.merge` holds them as JSON);
- a diffusers folder gives a diffusers folder, its changed weight files rewritten and the same
  description in `lathe-merge.json` beside them.

Each adapter layer's ΔW is the one LyCORIS' forward pass applies at multiplier `ratio`: the factored
forms of `trainer.shrink.adapter_layers` times their alpha/dim scale, once (LyCORIS 4.1.3's own
LoHa/LoKr `get_diff_weight` applies that scale twice; its forward does not). IA3 scales rows or
columns of the current weight, `diff_b` shifts the bias. Adapters are applied in the order given,
as sd-scripts' merge does; sd-scripts accepts negative ratios, and any finite ratio in −10…10 is taken.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.models.adapter_file import SAVE_PRECISION_CHOICES, modelspec_metadata, save_dtype
from trainer.core.failures import JobFailure, Reason
from trainer.core.jobdir import sha256_file
from trainer.shrink.adapter_layers import REFUSED_HINTS, materialize, parse_adapter, resolve_shape
from trainer.shrink.base_model import BaseModel
from trainer.core.shrink_errors import ShrinkError

MAX_RATIO = 10.0
MERGE_JSON = "lathe-merge.json"


@dataclass(frozen=True)
class MergeInput:
    path: str  # local adapter file
    ratio: float
    label: str = ""  # how the adapter is named in the metadata (its URI); the file name by default


@dataclass
class MergeReport:
    form: str  # "single_file" | "diffusers"
    output: str
    layers: int  # adapter layers merged, all adapters together
    changed_tensors: int
    parts: dict = field(default_factory=dict)  # what the metadata names: base and adapters with ratios
    seconds: float = 0.0


def mismatch(source: str, layer: str, why: str) -> JobFailure:
    return JobFailure(Reason.ADAPTER_MISMATCH, f"{source}: layer '{layer}': {why}")


def check_layer_fits(layer: Any, base_shape: tuple[int, ...] | None, arch: str, source: str) -> None:
    """A layer of `source` against the base's weight of the same name (None: the base has no such layer);
    a mismatch is the job's `adapter_mismatch`, naming the file and the layer."""
    if base_shape is None:
        raise mismatch(source, layer.name, f"the base model has no such layer; was the adapter trained on "
                       f"another architecture than '{arch}'?")
    try:
        resolve_shape(layer, base_shape, arch, source)
    except ShrinkError as exc:
        raise JobFailure(Reason.ADAPTER_MISMATCH, str(exc)) from None


def parse_adapter_file(path: str, source: str, refused: str) -> Any:
    """An adapter file's layers (`parse_adapter`), or `adapter_mismatch` naming `source`: unreadable, or
    holding layers whose change depends on more than the file (`refused` says what is not done)."""
    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is the same failure for the user
        raise JobFailure(Reason.ADAPTER_MISMATCH, f"{source}: not a safetensors adapter file ({exc})") from None
    for key in tensors:
        name, _, suffix = key.partition(".")
        if suffix in REFUSED_HINTS:
            raise mismatch(source, name, f"{REFUSED_HINTS[suffix]}; {refused}")
    try:
        return parse_adapter(tensors, source=source)
    except ShrinkError as exc:
        raise JobFailure(Reason.ADAPTER_MISMATCH, str(exc)) from None


class _Weights:
    """The base tensors the merge changes, in float32, by (file, key); read once, written back at the end."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[Path, str], torch.Tensor] = {}
        self.dtypes: dict[tuple[Path, str], torch.dtype] = {}

    def get(self, file: Path, key: str) -> torch.Tensor | None:
        slot = (file, key)
        if slot not in self.tensors:
            with safe_open(str(file), framework="pt") as handle:
                if key not in handle.keys():
                    return None
                value = handle.get_tensor(key)
            self.dtypes[slot] = value.dtype
            self.tensors[slot] = value.to(torch.float32)
        return self.tensors[slot]

    def by_file(self) -> dict[Path, dict[str, torch.Tensor]]:
        out: dict[Path, dict[str, torch.Tensor]] = {}
        for (file, key), value in self.tensors.items():
            out.setdefault(file, {})[key] = value
        return out


def _rows(tensor: torch.Tensor, chunk: int, chunks: int) -> torch.Tensor:
    """The view of a fused q/k/v weight (OpenCLIP in_proj) that one adapter layer targets."""
    if chunks == 1:
        return tensor
    rows = tensor.shape[0] // chunks
    return tensor[chunk * rows : (chunk + 1) * rows]


def _bias_key(key: str) -> str:
    return key[: -len("weight")] + "bias" if key.endswith("weight") else key + "_bias"


def _apply_adapter(base: BaseModel, weights: _Weights, item: MergeInput, arch: str) -> int:
    source = item.label or Path(item.path).name
    parsed = parse_adapter_file(item.path, source, "such layers are not merged")
    count = 0
    for layer in parsed.layers:
        where = base.source(layer.name)
        check_layer_fits(layer, None if where is None else base.shape(layer.name), arch, source)
        file, key, chunk, chunks = where
        target = _rows(weights.get(file, key), chunk, chunks)
        delta = materialize(layer.structure()).reshape(target.shape)
        if not torch.isfinite(delta).all():
            raise mismatch(source, layer.name, "its weights are not finite (NaN/inf)")
        target.add_(delta, alpha=item.ratio)
        if "diff_b" in layer.extra:
            _add_bias(weights, file, key, chunk, chunks, layer.extra["diff_b"], item.ratio, source, layer.name)
        count += 1
    for name, kind in parsed.passthrough_kinds.items():
        if kind == "diff_b" and any(layer.name == name for layer in parsed.layers):
            continue  # applied with its layer above
        where = base.source(name)
        if where is None:
            raise mismatch(source, name, "the base model has no such layer")
        file, key, chunk, chunks = where
        if kind == "ia3":
            target = _rows(weights.get(file, key), chunk, chunks)
            w = parsed.passthrough[f"{name}.weight"].to(torch.float32).flatten()
            on_input = bool(parsed.passthrough[f"{name}.on_input"].item()) if f"{name}.on_input" in parsed.passthrough else False
            axis = 1 if on_input else 0
            if target.shape[axis] != w.numel():
                raise mismatch(source, name, f"IA3 vector of {w.numel()} does not fit the base weight {tuple(target.shape)}")
            shape = [1] * target.dim()
            shape[axis] = w.numel()
            target.mul_(1 + item.ratio * w.reshape(shape))
        elif kind == "diff_b":
            _add_bias(weights, file, key, chunk, chunks, parsed.passthrough[f"{name}.diff_b"], item.ratio, source, name)
        elif kind == "norm":
            _add_norm(weights, parsed.passthrough, file, key, item.ratio, source, name)
        else:
            raise mismatch(source, name, f"'{kind}' layers are not merged")
        count += 1
    return count


def _add_bias(weights: _Weights, file: Path, key: str, chunk: int, chunks: int, diff: torch.Tensor, ratio: float,
              source: str, name: str) -> None:
    bias = weights.get(file, _bias_key(key))
    if bias is None:
        raise mismatch(source, name, "has a bias delta but the base layer has no bias")
    target = _rows(bias, chunk, chunks)
    if target.numel() != diff.numel():
        raise mismatch(source, name, f"bias delta of {diff.numel()} does not fit the base bias of {target.numel()}")
    target.add_(diff.to(torch.float32).reshape(target.shape), alpha=ratio)


def _add_norm(weights: _Weights, passthrough: dict[str, torch.Tensor], file: Path, key: str, ratio: float,
              source: str, name: str) -> None:
    """A trained norm layer (LyCORIS `train_norm`): its forward uses weight + ratio·w_norm and
    bias + ratio·b_norm, so the merge adds them to the base's affine weight and bias."""
    target = weights.get(file, key)
    w = passthrough[f"{name}.w_norm"]
    if target is None or target.dim() != 1 or target.numel() != w.numel():
        shape = None if target is None else tuple(target.shape)
        raise mismatch(source, name, f"norm weight delta of {w.numel()} does not fit the base weight {shape}")
    target.add_(w.to(torch.float32), alpha=ratio)
    if f"{name}.b_norm" in passthrough:
        _add_bias(weights, file, key, 0, 1, passthrough[f"{name}.b_norm"], ratio, source, name)


def _check_ratio(item: MergeInput) -> None:
    if not math.isfinite(item.ratio) or abs(item.ratio) > MAX_RATIO:
        raise JobFailure(Reason.SPEC_INVALID, f"{item.label or item.path}: ratio {item.ratio} is outside "
                         f"-{MAX_RATIO:g}…{MAX_RATIO:g}")


def merge_checkpoint(base_path: str, adapters: list[MergeInput], out_path: str, *, arch: str,
                     v_parameterization: bool = False, save_precision: str | None = None, title: str | None = None,
                     base_label: str | None = None) -> MergeReport:
    """Merge `adapters` into the base at `base_path`; writes `out_path` (a file for a single-file base,
    a folder for a diffusers folder). Raises JobFailure (adapter_mismatch, model_invalid, spec_invalid)."""
    t0 = time.monotonic()
    if not adapters:
        raise JobFailure(Reason.SPEC_INVALID, "merge: no adapters given")
    for item in adapters:
        _check_ratio(item)
    dtype = save_dtype(save_precision) if save_precision else None
    base_dir = Path(base_path)
    try:
        base = BaseModel(base_path)
    except ShrinkError as exc:
        raise JobFailure(Reason.MODEL_INVALID, str(exc).replace("--base ", "model.uri ")) from None
    weights = _Weights()
    layers = sum(_apply_adapter(base, weights, item, arch) for item in adapters)
    parts = {
        "base": {"name": base_label or base_dir.name, "form": "diffusers" if base_dir.is_dir() else "single_file",
                 "arch": arch},
        "adapters": [{"name": item.label or Path(item.path).name, "sha256": sha256_file(item.path),
                      "ratio": item.ratio} for item in adapters],
    }
    if base_dir.is_file():
        parts["base"]["sha256"] = sha256_file(base_dir)
    changed = weights.by_file()
    if base_dir.is_dir():
        _write_folder(base_dir, Path(out_path), changed, weights, None, parts)  # a folder keeps the base's dtypes
        form = "diffusers"
    else:
        meta = checkpoint_metadata(arch, v_parameterization, title, parts)
        _write_single(base_dir, Path(out_path), changed.get(base_dir, {}), weights, dtype, meta)
        form = "single_file"
    return MergeReport(form=form, output=out_path, layers=layers,
                       changed_tensors=sum(len(v) for v in changed.values()), parts=parts,
                       seconds=time.monotonic() - t0)


def checkpoint_metadata(arch: str, v_parameterization: bool, title: str | None, parts: dict) -> dict[str, str]:
    """modelspec keys of a checkpoint (sd-scripts' sai_model_spec without `/lora`) plus the merge's parts."""
    meta = modelspec_metadata(arch, v_parameterization, title or _title(parts), None)
    meta["modelspec.architecture"] = meta["modelspec.architecture"].removesuffix("/lora")
    meta["modelspec.description"] = "merge of " + " + ".join(
        [parts["base"]["name"]] + [f"{a['name']} × {a['ratio']:g}" for a in parts["adapters"]])
    meta["lathe.merge"] = json.dumps(parts, sort_keys=True)
    return meta


def _title(parts: dict) -> str:
    names = [Path(a["name"]).stem for a in parts["adapters"]]
    return f"{Path(parts['base']['name']).stem} + {', '.join(names)}"


def _cast(value: torch.Tensor, original: torch.dtype, dtype: torch.dtype | None) -> torch.Tensor:
    if not value.is_floating_point():
        return value
    return value.to(dtype or original).contiguous()


def _write_single(base: Path, out: Path, changed: dict[str, torch.Tensor], weights: _Weights,
                  dtype: torch.dtype | None, meta: dict[str, str]) -> None:
    tensors = load_file(str(base))
    for key, value in changed.items():
        tensors[key] = value.to(weights.dtypes[(base, key)])
    if dtype is not None:
        tensors = {k: _cast(v, v.dtype, dtype) for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)


def _write_folder(base: Path, out: Path, changed: dict[Path, dict[str, torch.Tensor]], weights: _Weights,
                  dtype: torch.dtype | None, parts: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    for file, values in changed.items():
        target = out / file.relative_to(base)
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(file))
        for key, value in values.items():
            tensors[key] = value.to(weights.dtypes[(file, key)])
        if dtype is not None:
            tensors = {k: _cast(v, v.dtype, dtype) for k, v in tensors.items()}
        save_file(tensors, str(target), metadata=meta)
    description = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **parts}
    (out / MERGE_JSON).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer merge", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="base model: single-file .safetensors or diffusers folder")
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER[:RATIO]", help="adapter files, ratio default 1")
    parser.add_argument("-o", "--out", required=True, help="output file (single-file base) or folder (diffusers base)")
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--v-parameterization", action="store_true")
    parser.add_argument("--save-precision", choices=SAVE_PRECISION_CHOICES)
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    inputs = []
    for item in args.adapters:
        path, sep, ratio = item.rpartition(":")
        try:
            inputs.append(MergeInput(path, float(ratio)) if sep else MergeInput(item, 1.0))
        except ValueError:
            inputs.append(MergeInput(item, 1.0))
    try:
        report = merge_checkpoint(args.base, inputs, args.out, arch=args.arch, v_parameterization=args.v_parameterization,
                                  save_precision=args.save_precision, title=args.title)
    except JobFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"output": report.output, "form": report.form, "layers": report.layers,
                      "changed_tensors": report.changed_tensors, "seconds": round(report.seconds, 2)}))
    return 0
