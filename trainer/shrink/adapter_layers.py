"""Reading an sd-scripts / LyCORIS adapter file into per-layer weight deltas in factored form.

Each layer's delta is described by its structure (a product of two factors, a Kronecker product, or a
dense matrix) together with the scale its loaders apply, exactly as LyCORIS computes it:
- LoRA / LoCon / DyLoRA: ΔW = (alpha/dim)·up@down, Tucker `lora_mid` folded into the down factor;
- LoHa: ΔW = (alpha/dim)·(w1a@w1b)⊙(w2a@w2b), Tucker halves rebuilt with `hada_t1/t2`;
- LoKr: ΔW = (alpha/dim)·w1⊗w2, each half full or factored, w2 optionally Tucker; scale 1 when both
  halves are full matrices (LyCORIS forces alpha = dim then);
- full: ΔW = `diff`.
IA3 (`weight`/`on_input`), norm (`w_norm`/`b_norm`) and full-bias (`diff_b`) tensors scale or shift a
layer rather than add a low-rank matrix: they are passed through unchanged (see docs/shrink.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.core.shrink_errors import ShrinkError
from .spectrum import (DenseSpectrum, Kept, KronSpectrum, Spectrum, kept_factors, product_spectra, product_spectrum,
                       reduce_products)

LORA_SUFFIXES = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"})
LOHA_SUFFIXES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"})
LOKR_SUFFIXES = frozenset(
    {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
)
FULL_SUFFIXES = frozenset({"diff", "diff_b"})
IA3_SUFFIXES = frozenset({"weight", "on_input"})
NORM_SUFFIXES = frozenset({"w_norm", "b_norm"})
# Keys that are passed through unchanged: they cannot be expressed as a low-rank weight delta.
PASSTHROUGH_KINDS = {"ia3": IA3_SUFFIXES, "norm": NORM_SUFFIXES}
REFUSED_HINTS = {
    "dora_scale": "DoRA (weight-decomposed) layers rescale the merged weight by the base's column norms,"
    " so their effect is not a fixed low-rank delta",
    "oft_blocks": "OFT/BOFT layers rotate the base weight (multiplicative), not an additive delta",
    "oft_diag": "OFT layers rotate the base weight (multiplicative), not an additive delta",
    "a1.weight": "GLoRA layers depend on the base weight (multiplicative part)",
    "lambda_layer": "T-LoRA layers are timestep-dependent",
}
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


# --- delta structures --------------------------------------------------------------------------


@dataclass
class Product:
    """ΔW = scale · left @ right (left: out × k, right: k × in_flat)."""

    left: Tensor
    right: Tensor
    scale: float = 1.0


@dataclass
class Dense:
    """ΔW = scale · matrix."""

    matrix: Tensor
    scale: float = 1.0


@dataclass
class Kron:
    """ΔW = scale · a ⊗ b, with a and b themselves products or dense matrices."""

    a: Product | Dense
    b: Product | Dense
    scale: float = 1.0


Structure = Product | Dense | Kron


def spectrum_of(structure: Structure) -> Spectrum:
    """Exact singular values (and vectors on demand) of the delta, from its factors."""
    if isinstance(structure, Product):
        return product_spectrum(structure.left, structure.right, structure.scale)
    if isinstance(structure, Dense):
        return DenseSpectrum(structure.matrix, structure.scale)
    return KronSpectrum(spectrum_of(structure.a), spectrum_of(structure.b), structure.scale)


def spectra_of(structures: list[Structure], map_fn: Callable = map) -> list[Spectrum]:
    """`spectrum_of` for many deltas: the products among them are decomposed together (their small
    k×k work batched, their Gram products through `map_fn`), the rest one by one."""
    products = [i for i, s in enumerate(structures) if isinstance(s, Product)]
    batched = product_spectra([(structures[i].left, structures[i].right, structures[i].scale) for i in products], map_fn)
    out: list[Spectrum | None] = [None] * len(structures)
    for i, spec in zip(products, batched):
        out[i] = spec
    rest = [i for i, spec in enumerate(out) if spec is None]
    for i, spec in zip(rest, map_fn(spectrum_of, [structures[i] for i in rest])):
        out[i] = spec
    return out  # type: ignore[return-value]


def reductions_of(structures: list[Structure], select: Callable[[list[int], list[Spectrum]], list[Kept]],
                  dtype: torch.dtype, map_fn: Callable = map) -> list[tuple[Spectrum, Kept, tuple[Tensor, Tensor]]]:
    """For rank rules that decide each layer on its own: every delta's spectrum, what `select` keeps of
    it (called with positions into `structures` and their spectra), and the kept factors in `dtype`.
    Products go through `reduce_products` (one pass per batch); the rest one by one."""
    products = [i for i, s in enumerate(structures) if isinstance(s, Product)]
    out: list = [None] * len(structures)
    reduced = reduce_products(
        [(structures[i].left, structures[i].right, structures[i].scale) for i in products],
        lambda positions, spectra: select([products[p] for p in positions], spectra), dtype, map_fn,
    )
    for i, result in zip(products, reduced):
        out[i] = result
    rest = [i for i, result in enumerate(out) if result is None]
    spectra = list(map_fn(spectrum_of, [structures[i] for i in rest]))
    kept = select(rest, spectra) if rest else []
    factors = kept_factors([(spec, *k) for spec, k in zip(spectra, kept)], dtype, map_fn)
    for i, spec, k, pair in zip(rest, spectra, kept, factors):
        out[i] = (spec, k, pair)
    return out


def materialize(structure: Structure) -> Tensor:
    """The delta as a matrix (out × in_flat): the reference the exact SVD is checked against."""
    if isinstance(structure, Product):
        return structure.scale * (structure.left @ structure.right)
    if isinstance(structure, Dense):
        return structure.scale * structure.matrix
    return structure.scale * torch.kron(materialize(structure.a), materialize(structure.b))


def inner_size(structure: Structure) -> int:
    """An upper bound on rank(ΔW) read from the factor shapes."""
    if isinstance(structure, Product):
        return min(structure.left.shape[0], structure.left.shape[1], structure.right.shape[1])
    if isinstance(structure, Dense):
        return min(structure.matrix.shape)
    return inner_size(structure.a) * inner_size(structure.b)


# --- layers ------------------------------------------------------------------------------------


@dataclass
class AdapterLayer:
    """One adapted module of the file: its name, algorithm, tensors (by key suffix) and shape."""

    name: str
    algo: str  # "lora" | "loha" | "lokr" | "full"
    tensors: dict[str, Tensor]
    weight_shape: tuple[int, ...] = ()  # (out, in, *kernel) of the adapted module, once resolved
    extra: dict[str, Tensor] = field(default_factory=dict)  # passthrough keys (`diff_b`), by suffix

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) > 2

    @property
    def nominal_rank(self) -> int:
        """The `dim` the adapter was trained with (what `ss_network_dim` counts)."""
        t = self.tensors
        if self.algo == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.algo == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algo == "lokr":
            dim = _lokr_dim(t)
            return dim if dim is not None else min(self.weight_shape[0], math.prod(self.weight_shape[1:]))
        return min(self.weight_shape[0], math.prod(self.weight_shape[1:]))

    @property
    def scale(self) -> float:
        """The factor loaders multiply the factor product by (alpha/dim, or 1)."""
        t = self.tensors
        alpha = float(t["alpha"].float().item()) if "alpha" in t else None
        if self.algo in ("lora", "loha"):
            return 1.0 if alpha is None or alpha == 0 else alpha / self.nominal_rank
        if self.algo == "lokr":
            dim = _lokr_dim(t)
            return 1.0 if alpha is None or alpha == 0 or dim is None else alpha / dim
        return 1.0

    @property
    def output_scale(self) -> float:
        """The alpha/dim ratio the shrunk layer keeps: the input's for LoRA-like inputs (as
        sd-scripts and resize_lora do), 1 otherwise (alpha = rank, factors carry the magnitude)."""
        return abs(self.scale) if self.algo == "lora" else 1.0

    def structure(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> Structure:
        """The delta's factored form, its tensors in `dtype`. With dtype None a plain LoRA's two factors
        stay in their stored precision (the spectrum code upcasts them one at a time, so float32 copies
        of every factor are never held at once); anything computed here is float32."""
        out = self.weight_shape[0]
        if dtype is None and self.algo == "lora" and "lora_mid.weight" not in self.tensors:
            t = {k: v.to(device=device) for k, v in self.tensors.items() if k != "alpha"}
            return Product(t["lora_up.weight"].reshape(out, -1), t["lora_down.weight"].flatten(1), self.scale)
        t = {k: v.to(device=device, dtype=dtype or torch.float32) for k, v in self.tensors.items() if k != "alpha"}
        if self.algo == "lora":
            up = t["lora_up.weight"].reshape(out, -1)
            down = t["lora_down.weight"].flatten(1)
            if "lora_mid.weight" in t:
                down = _tucker_right(t["lora_mid.weight"], down)
            return Product(up, down, self.scale)
        if self.algo == "loha":
            if "hada_t1" in t:
                l1, r1 = t["hada_w1_a"].T, _tucker_right(t["hada_t1"], t["hada_w1_b"])
                l2, r2 = t["hada_w2_a"].T, _tucker_right(t["hada_t2"], t["hada_w2_b"])
            else:
                l1, r1 = t["hada_w1_a"], t["hada_w1_b"].flatten(1)
                l2, r2 = t["hada_w2_a"], t["hada_w2_b"].flatten(1)
            left, right = _face_split(l1, r1, l2, r2)
            return Product(left, right, self.scale)
        if self.algo == "lokr":
            a = Dense(t["lokr_w1"]) if "lokr_w1" in t else Product(t["lokr_w1_a"], t["lokr_w1_b"])
            if "lokr_w2" in t:
                b: Product | Dense = Dense(t["lokr_w2"].flatten(1))
            elif "lokr_t2" in t:
                b = Product(t["lokr_w2_a"].T, _tucker_right(t["lokr_t2"], t["lokr_w2_b"]))
            else:
                b = Product(t["lokr_w2_a"], t["lokr_w2_b"].flatten(1))
            return Kron(a, b, self.scale)
        return Dense(t["diff"].flatten(1))


def _tucker_right(core: Tensor, down: Tensor) -> Tensor:
    """Right factor of a Tucker-2 conv delta: R[i, (q, k)] = Σ_j core[i, j, k]·down[j, q]."""
    r = core.shape[0]
    return torch.einsum("ij...,jq->iq...", core, down.flatten(1)).reshape(r, -1)


def _face_split(l1: Tensor, r1: Tensor, l2: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
    """(L, R) with L @ R == (l1 @ r1) ⊙ (l2 @ r2): row-wise / column-wise Khatri–Rao products."""
    m, k1 = l1.shape
    k2 = l2.shape[1]
    left = (l1[:, :, None] * l2[:, None, :]).reshape(m, k1 * k2)
    right = (r1[:, None, :] * r2[None, :, :]).reshape(k1 * k2, r1.shape[1])
    return left, right


def _lokr_dim(t: dict[str, Tensor]) -> int | None:
    """LoKr's `dim` as loaders read it (ComfyUI/A1111): the factored half's rank, None if both full."""
    if "lokr_w2_b" in t:
        return int(t["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in t:
        return int(t["lokr_w1_b"].shape[0])
    return None


# --- parsing a file ----------------------------------------------------------------------------


@dataclass
class ParsedAdapter:
    layers: list[AdapterLayer]
    passthrough: dict[str, Tensor]  # full keys copied unchanged (IA3, norms, diff_b)
    passthrough_kinds: dict[str, str]  # layer name -> "ia3" | "norm" | "diff_b"
    ignored: list[str]  # keys dropped on purpose (orphan alphas)


def split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x_y.lora_down.weight` -> (`lora_unet_x_y`, `lora_down.weight`)."""
    name, dot, suffix = key.partition(".")
    if not dot:
        raise ShrinkError(
            f"key '{key}' has no '.<suffix>': not an sd-scripts/LyCORIS adapter key "
            "(expected e.g. 'lora_unet_..._to_q.lora_down.weight')"
        )
    return name, suffix


def parse_adapter(tensors: dict[str, Tensor], *, source: str = "adapter") -> ParsedAdapter:
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        groups.setdefault(name, {})[suffix] = value
    if groups and not any(name.startswith(LORA_PREFIXES) for name in groups):
        sample = next(iter(tensors))
        raise ShrinkError(
            f"{source}: no key uses sd-scripts naming ('lora_unet_…', 'lora_te_…'; first key: '{sample}');"
            " convert PEFT/diffusers-format adapters to sd-scripts keys first"
        )

    layers: list[AdapterLayer] = []
    passthrough: dict[str, Tensor] = {}
    kinds: dict[str, str] = {}
    ignored: list[str] = []
    for name, group in groups.items():
        suffixes = set(group)
        for marker, why in REFUSED_HINTS.items():
            if marker in suffixes:
                raise ShrinkError(
                    f"{source}: layer '{name}' has '{name}.{marker}': {why}; it cannot be re-factored"
                    " as a plain LoRA. Shrink is refused for this file (merge it into the base instead)."
                )
        if suffixes <= {"alpha"}:
            ignored.append(f"{name}.alpha")
            continue
        kind = next((k for k, allowed in PASSTHROUGH_KINDS.items() if suffixes <= allowed), None)
        if kind is not None:
            for suffix, value in group.items():
                passthrough[f"{name}.{suffix}"] = value
            kinds[name] = kind
            continue
        algo = _classify(name, suffixes, source)
        extra = {}
        if "diff_b" in group:
            extra["diff_b"] = group.pop("diff_b")
            passthrough[f"{name}.diff_b"] = extra["diff_b"]
            kinds[name] = "diff_b"
        layers.append(AdapterLayer(name=name, algo=algo, tensors=group, extra=extra))
    return ParsedAdapter(layers=layers, passthrough=passthrough, passthrough_kinds=kinds, ignored=ignored)


def _classify(name: str, suffixes: set[str], source: str) -> str:
    candidates = [
        ("lora", LORA_SUFFIXES, {"lora_down.weight", "lora_up.weight"}),
        ("loha", LOHA_SUFFIXES, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
        ("lokr", LOKR_SUFFIXES, set()),
        ("full", FULL_SUFFIXES, {"diff"}),
    ]
    for algo, allowed, required in candidates:
        if suffixes <= allowed and required <= suffixes:
            if algo == "lokr":
                _check_lokr(name, suffixes, source)
            return algo
    known = sorted(LORA_SUFFIXES | LOHA_SUFFIXES | LOKR_SUFFIXES | FULL_SUFFIXES | IA3_SUFFIXES | NORM_SUFFIXES)
    raise ShrinkError(
        f"{source}: layer '{name}' has keys {sorted(suffixes)} that form no known adapter algorithm"
        f" (known suffixes: {', '.join(known)}); the file may be truncated or from an unsupported tool"
    )


def _check_lokr(name: str, suffixes: set[str], source: str) -> None:
    has_w1 = "lokr_w1" in suffixes or {"lokr_w1_a", "lokr_w1_b"} <= suffixes
    has_w2 = "lokr_w2" in suffixes or {"lokr_w2_a", "lokr_w2_b"} <= suffixes
    if not (has_w1 and has_w2):
        raise ShrinkError(f"{source}: LoKr layer '{name}' lacks a complete w1 or w2 half: {sorted(suffixes)}")


# --- shapes ------------------------------------------------------------------------------------

# Modules of SD UNets whose weights are convolutions: 3×3 unless listed as 1×1.
_CONV3_NAME = re.compile(
    r"(_conv1|_conv2|_downsamplers_0_conv|_upsamplers_0_conv|^lora_unet_conv_in|^lora_unet_conv_out"
    r"|_in_layers_2|_out_layers_3|_op|^lora_unet_input_blocks_0_0|^lora_unet_out_2"
    r"|^lora_unet_output_blocks_\d+_\d+_conv)$"
)
_CONV1_NAME = re.compile(r"(_conv_shortcut|_skip_connection)$")
_PROJ_NAME = re.compile(r"^lora_unet_.*_(proj_in|proj_out)$")


def kernel_from_name(name: str, arch: str) -> tuple[int, ...] | None:
    """The conv kernel of an SD UNet module from its sd-scripts name; None for a linear module.

    Only needed for LoHa/LoKr layers whose factors flatten the kernel away (no base model given).
    `proj_in`/`proj_out` are 1×1 convs in SD1.x and linear in SD2.x/SDXL.
    """
    if _CONV3_NAME.search(name):
        return (3, 3)
    if _CONV1_NAME.search(name):
        return (1, 1)
    if arch == "sd1" and _PROJ_NAME.search(name):
        return (1, 1)
    return None


def resolve_shape(layer: AdapterLayer, base_shape: tuple[int, ...] | None, arch: str, source: str) -> None:
    """Sets `layer.weight_shape` from the factors, else the base model, else the module's name."""
    t = layer.tensors
    if layer.algo == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        kernel = tuple(t["lora_mid.weight"].shape[2:]) if "lora_mid.weight" in t else tuple(down.shape[2:])
        if kernel == (1, 1) and base_shape is not None and len(base_shape) == 2:
            kernel = ()
        shape = (up.shape[0], down.shape[1], *kernel)
        _check_rank_match(layer, down.shape[0], up.shape[1], source)
    elif layer.algo == "full":
        shape = tuple(t["diff"].shape)
    else:
        out, in_flat, kernel_known = _flat_shape(layer)
        if kernel_known is not None:
            shape = (out, in_flat // math.prod(kernel_known), *kernel_known) if kernel_known else (out, in_flat)
        elif base_shape is not None:
            shape = tuple(base_shape)
        else:
            kernel = kernel_from_name(layer.name, arch) or ()
            k = math.prod(kernel) if kernel else 1
            if in_flat % k:
                raise ShrinkError(
                    f"{source}: cannot tell the conv kernel of '{layer.name}' (input size {in_flat} is not a"
                    f" multiple of {kernel}); pass --base with the model the adapter was trained on"
                )
            shape = (out, in_flat // k, *kernel)
    if base_shape is not None and math.prod(base_shape) != math.prod(shape):
        raise ShrinkError(
            f"{source}: layer '{layer.name}' has shape {tuple(shape)} but the base model's weight is"
            f" {tuple(base_shape)}: the adapter was not trained on this base model"
        )
    if base_shape is not None and len(base_shape) == len(shape):
        shape = tuple(base_shape)
    layer.weight_shape = tuple(int(s) for s in shape)


def _check_rank_match(layer: AdapterLayer, down_rank: int, up_rank: int, source: str) -> None:
    if down_rank != up_rank:
        raise ShrinkError(
            f"{source}: layer '{layer.name}': lora_down has rank {down_rank} but lora_up has {up_rank}"
        )


def _flat_shape(layer: AdapterLayer) -> tuple[int, int, tuple[int, ...] | None]:
    """(out, in·kernel, kernel if the factors show it else None) of a LoHa/LoKr layer."""
    t = layer.tensors
    if layer.algo == "loha":
        if "hada_t1" in t:
            kernel = tuple(t["hada_t1"].shape[2:])
            out, inn = t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1]
            return out, inn * math.prod(kernel), kernel
        out, in_flat = t["hada_w1_a"].shape[0], t["hada_w1_b"].flatten(1).shape[1]
        return out, in_flat, None
    w1_out, w1_in = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
        return w1_out * w2.shape[0], w1_in * math.prod(w2.shape[1:]), tuple(w2.shape[2:])
    if "lokr_t2" in t:
        kernel = tuple(t["lokr_t2"].shape[2:])
        return w1_out * t["lokr_w2_a"].shape[1], w1_in * t["lokr_w2_b"].shape[1] * math.prod(kernel), kernel
    return w1_out * t["lokr_w2_a"].shape[0], w1_in * t["lokr_w2_b"].flatten(1).shape[1], None
