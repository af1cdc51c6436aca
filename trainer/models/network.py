"""The trained adapter: LyCORIS modules on the UNet / text encoders, named as sd-scripts names them.

Module *selection* is ours (presets, sd-scripts' `networks.lora` layer set, `block_dims`): LyCORIS'
built-in presets are class-level globals and two of them break on diffusers UNets. Module
*implementations* (LoRA/LoCon, LoHa, LoKr, IA3, DyLoRA, full, GLoRA, BOFT, diag-OFT, norms) are
LyCORIS' own, so the tensors and their suffixes are exactly what LyCORIS/sd-scripts write. Each
module is registered under its sd-scripts name (`lora_unet_...`, SGM names for SDXL), so the
network's state dict is the adapter file's content as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from torch import nn

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import Algo, NetworkSpec
from trainer.models import keys

log = logging.getLogger(__name__)

ALGOS: tuple[str, ...] = get_args(Algo)
TE_ATTENTION = ("CLIPAttention",)
TE_ALL = ("CLIPAttention", "CLIPMLP")
RESNET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TOP_LEVEL_CONVS = ("conv_in", "conv_out")
TIME_EMBEDDING = ("time_embedding.linear_1", "time_embedding.linear_2")


@dataclass(frozen=True)
class Preset:
    """Which layers a network covers: module classes whose layers are adapted, single module
    paths, and whether 3x3 convolutions are included."""

    unet_classes: tuple[str, ...]
    unet_names: tuple[str, ...] = ()
    te_classes: tuple[str, ...] = TE_ALL
    te_names: tuple[str, ...] = ()
    conv: bool = False
    # LyCORIS options per module path suffix (IA3 trains the MLP output on its input).
    options_by_suffix: dict = field(default_factory=dict)


# LyCORIS' presets re-stated for diffusers models. SDXL's add_embedding is never included
# (diffusers' loader drops it; sd-scripts' SGM UNet has no TimestepEmbedding class for it).
PRESETS: dict[str, Preset] = {
    "full": Preset(("Transformer2DModel", *RESNET_BLOCKS), TOP_LEVEL_CONVS + TIME_EMBEDDING, conv=True),
    "full-lin": Preset(("Transformer2DModel", "ResnetBlock2D"), TIME_EMBEDDING),
    "attn-mlp": Preset(("Transformer2DModel",)),
    "attn-only": Preset(("Attention",), te_classes=TE_ATTENTION),
    "unet-transformer-only": Preset(("Transformer2DModel",), te_classes=()),
    "unet-convblock-only": Preset(RESNET_BLOCKS, TOP_LEVEL_CONVS, te_classes=(), conv=True),
}
IA3_PRESET = Preset((), ("to_k", "to_v", "ff.net.2"), te_classes=(), te_names=("k_proj", "v_proj", "mlp.fc2"),
                    options_by_suffix={"ff.net.2": {"train_on_input": True}, "mlp.fc2": {"train_on_input": True}})
GLORA_UNET_CLASSES = ("Transformer2DModel", "Attention")  # LyCORIS trains GLoRA on transformers only


@dataclass
class _Target:
    path: str
    module: nn.Module
    lora_name: str
    dim: int
    alpha: float
    options: dict


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _is_norm(m: nn.Module) -> bool:
    return "Norm" in type(m).__name__


def _walk(root: nn.Module, classes, names, *, suffix_names: bool) -> Iterator[tuple[str, nn.Module]]:
    """Leaf layers inside modules of the given classes, then modules named in `names` (exact path,
    or path suffix for IA3-style targets). Each path once, in model order."""
    seen = set()
    for path, module in root.named_modules():
        if classes and type(module).__name__ in classes:
            for child_path, child in module.named_modules():
                full = f"{path}.{child_path}" if child_path else path
                if full not in seen and not list(child.children()):
                    seen.add(full)
                    yield full, child
        elif names and (path in names or (suffix_names and any(path.endswith("." + n) for n in names))):
            if path not in seen:
                seen.add(path)
                yield path, module


class AdapterNetwork(nn.Module):
    """LyCORIS modules registered under their sd-scripts names."""

    def __init__(self, spec: NetworkSpec, parts, targets: list[_Target], unet_names: set[str], te_names: list[set[str]]):
        super().__init__()
        self.spec = spec
        self.arch = parts.arch
        self._unet_names = unet_names
        self._te_names = te_names
        self.applied = False
        for t in targets:
            self.add_module(t.lora_name, _make_module(t, spec))

    # -- properties for metadata
    algo = property(lambda self: self.spec.algo if self.spec.module == "lycoris.kohya" else "lora")
    dim = property(lambda self: self.spec.dim)
    alpha = property(lambda self: self.spec.alpha)
    conv_dim = property(lambda self: self.spec.conv_dim or None)  # 0 (no convs) is recorded as unset
    conv_alpha = property(lambda self: self.spec.conv_alpha)

    def loras(self) -> list[nn.Module]:
        return list(self.children())

    def apply_to(self) -> None:
        """Hook every module into the forward of the layer it adapts (the layer stays frozen)."""
        if self.applied:
            return
        for module in self.loras():
            module.apply_to()
        self.applied = True

    def restore(self) -> None:
        """Unhook every module: the model computes without the adapter again."""
        if not self.applied:
            return
        for module in reversed(self.loras()):
            module.restore()
        self.applied = False

    def _groups(self) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
        unet, tes = [], [[] for _ in self._te_names]
        for name, module in self.named_children():
            params = [p for p in module.parameters() if p.requires_grad]
            if name in self._unet_names:
                unet += params
            else:
                index = next(i for i, names in enumerate(self._te_names) if name in names)
                tes[index] += params
        return unet, tes

    def param_groups(self, *, unet_lr: float, text_encoder_lr: float | list[float]) -> list[dict]:
        """Optimizer groups: one per text encoder (SDXL may give a list of two rates) and one for
        the UNet, each with its `lr`. Groups with lr 0 are left out, as sd-scripts does."""
        unet, tes = self._groups()
        rates = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr] * len(tes)
        if len(rates) == 1 and len(tes) > 1:
            rates = list(rates) * len(tes)
        if len(rates) != len(tes):
            raise JobFailure(Reason.SPEC_INVALID, f"text_encoder_lr has {len(rates)} values, the model has {len(tes)} text encoders")
        groups = []
        for i, (params, lr) in enumerate(zip(tes, rates)):
            if params and lr:
                groups.append({"params": params, "lr": float(lr), "name": "textencoder" if len(tes) == 1 else f"textencoder{i + 1}"})
        if unet and unet_lr:
            groups.append({"params": unet, "lr": float(unet_lr), "name": "unet"})
        return groups

    def state_dict_for_save(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The adapter file's tensors: each module's state dict in the layout readers apply as trained
        (`trainer.models.adapter_layout`), in `dtype`."""
        from trainer.models.adapter_layout import to_file

        out = {}
        with torch.no_grad():
            for name, module in self.named_children():
                own = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
                for suffix, value in to_file(module, own).items():
                    if dtype is not None and value.is_floating_point():
                        value = value.to(dtype)
                    out[f"{name}.{suffix}"] = value.contiguous()
        return out

    def load_weights(self, path: str) -> None:
        """Continue from an adapter file (`network_weights`): names must match this network."""
        tensors = read_adapter_tensors(path)
        own = {name: module for name, module in self.named_children()}
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        unknown = []
        for key, value in tensors.items():
            name, _, suffix = key.partition(".")
            if name in own:
                by_module.setdefault(name, {})[suffix] = value
            else:
                unknown.append(key)
        if not by_module:
            raise JobFailure(Reason.SPEC_INVALID, f"network weights {path}: none of its {len(tensors)} keys match this "
                             f"network (e.g. {sorted(tensors)[:2]}); was it trained for another architecture or preset?")
        if unknown:
            log.warning("network weights %s: %d keys not in this network ignored (e.g. %s)", path, len(unknown), unknown[:3])
        missing = sorted(set(own) - set(by_module))
        if missing:
            log.warning("network weights %s: %d modules start fresh (e.g. %s)", path, len(missing), missing[:3])
        from trainer.models.adapter_layout import from_file

        for name, sd in by_module.items():
            try:
                _load_module(own[name], from_file(own[name], sd))
            except (RuntimeError, KeyError, ValueError) as e:
                raise JobFailure(Reason.SPEC_INVALID, f"network weights {path}: module {name} does not fit this "
                                 f"network's algo/dim ({e}); use the same network settings it was trained with") from e

    def load_training_weights(self, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a checkpoint's `state_dict()` (the training form) back. Returns (parameters not restored,
        unexpected keys). LyCORIS' DyLoRA saves its rank blocks as whole `lora_up`/`lora_down` matrices
        and ignores them on load, so its modules are split back here."""
        from lycoris.modules.dylora import DyLoraModule

        dylora = {name: m for name, m in self.named_children() if isinstance(m, DyLoraModule)}
        missing, unexpected = self.load_state_dict(
            {k: v for k, v in weights.items() if k.partition(".")[0] not in dylora}, strict=False)
        params = dict(self.named_parameters())
        missing = [k for k in missing if k in params and k.partition(".")[0] not in dylora]
        for name, module in dylora.items():
            own = {k.partition(".")[2]: v for k, v in weights.items() if k.partition(".")[0] == name}
            if {"lora_up.weight", "lora_down.weight", "alpha"} <= set(own):
                _load_module(module, own)
            else:
                missing += [f"{name}.{k}" for k, _ in module.named_parameters()]
        return missing, list(unexpected)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device) -> tuple[int, float, float]:
        """Scale modules whose weight delta norm exceeds `max_norm` (sd-scripts' scale_weight_norms).
        Returns (modules scaled, average norm, max norm), norms after scaling."""
        scaled_count, norms = 0, []
        for module in self.loras():
            scaled, norm = module.apply_max_norm(max_norm, device)
            if scaled is None:
                continue
            norms.append(float(norm))
            scaled_count += int(scaled)
        if not norms:
            return 0, 0.0, 0.0
        return scaled_count, sum(norms) / len(norms), max(norms)

    def modules_count(self) -> dict:
        counts = {"unet": len(self._unet_names)}
        if len(self._te_names) == 1:
            counts["text_encoder"] = len(self._te_names[0])
        for i, names in enumerate(self._te_names):
            if len(self._te_names) > 1:
                counts[f"text_encoder_{i + 1}"] = len(names)
        return counts


def _module_options(spec: NetworkSpec) -> dict:
    return dict(use_scalar=spec.use_scalar, rank_dropout_scale=spec.rank_dropout_scale,
                decompose_both=spec.decompose_both, factor=spec.factor, block_size=spec.block_size)


def _make_module(t: _Target, spec: NetworkSpec) -> nn.Module:
    from lycoris.modules.norms import NormModule
    from lycoris.wrapper import network_module_dict

    # An unset dropout is no dropout.
    dropout, rank_dropout, module_dropout = spec.dropout or 0.0, spec.rank_dropout or 0.0, spec.module_dropout or 0.0
    if _is_norm(t.module):
        return NormModule(t.lora_name, t.module, 1.0, rank_dropout, module_dropout, **_module_options(spec))
    if spec.module == "networks.lora":
        from trainer.models.kohya_lora import KohyaLoRAModule as cls

        # networks.lora ignores LyCORIS' own options (use_scalar, rank_dropout_scale, …), as sd-scripts does.
        kind, use_tucker, options = "lora", False, dict(t.options)
    else:
        kind, cls = spec.algo, network_module_dict[spec.algo]
        use_tucker, options = spec.use_tucker, _module_options(spec) | t.options
    if kind in ("lora", "locon") and _bypass(spec.module, dropout, rank_dropout):
        options["bypass_mode"] = True
    return cls(t.lora_name, t.module, 1.0, t.dim, t.alpha, dropout, rank_dropout, module_dropout, use_tucker, **options)


def _bypass(network_module: str, dropout: float, rank_dropout: float) -> bool:
    """Whether a LoRA/LoCon layer runs as y = Wx + up(down(x))·scale instead of rebuilding W + ΔW.

    LyCORIS' default rebuild forms the full out×in ΔW of every layer at every step, then subtracts W
    back out in the frozen weights' dtype: about four full-size tensors per layer, a second full GEMM,
    and in bf16 the subtraction rounds most of ΔW away. The bypass form is what sd-scripts'
    networks.lora computes, costs rank-r work only, and gives the same output up to round-off.
    LyCORIS defines the dropouts differently in the two forms (rebuild drops rows of ΔW and ignores
    neuron dropout), so lycoris.kohya keeps the rebuild form when a dropout is asked for; networks.lora
    always runs bypassed, through sd-scripts' own dropout rules (`trainer.models.kohya_lora`).
    """
    return network_module == "networks.lora" or (not dropout and not rank_dropout)


def _load_module(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from lycoris.modules.dylora import DyLoraModule

    if isinstance(module, DyLoraModule):
        # LyCORIS' DyLoRA ignores load_state_dict: split the saved matrices back into its rank blocks.
        down = sd["lora_down.weight"].reshape(len(module.down_list) * module.down_list[0].shape[0], -1)
        up = sd["lora_up.weight"]
        start = 0
        for d, u in zip(module.down_list, module.up_list):
            rows = d.shape[0]
            d.data.copy_(down[start : start + rows].reshape(d.shape))
            u.data.copy_(up[:, start : start + rows].reshape(u.shape))
            start += rows
        module.alpha.copy_(sd["alpha"])
        return
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if unexpected:
        raise KeyError(f"unexpected tensors {unexpected}")


def read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise JobFailure(Reason.SPEC_INVALID, f"network weights {path} not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    except Exception as e:
        raise JobFailure(Reason.SPEC_INVALID, f"network weights {path} cannot be read ({type(e).__name__}: {e})") from e


# -------------------------------------------------------------------------------------- building

def _dims_for(spec: NetworkSpec, module: nn.Module, lora_name: str, arch: str) -> tuple[int, float] | None:
    """(dim, alpha) of one layer, or None to skip it (sd-scripts' and LyCORIS' rules)."""
    is_linear_like = isinstance(module, nn.Linear) or (_is_conv(module) and module.kernel_size[0] == 1)
    if spec.module == "networks.lora":
        return _kohya_dims(spec, is_linear_like, lora_name, arch)
    if is_linear_like:
        return spec.dim, spec.alpha
    # LyCORIS: 3x3 convs at conv_dim (default: dim) / conv_alpha (default: alpha); conv_dim 0 leaves them out.
    if spec.conv_dim == 0:
        return None
    return spec.conv_dim or spec.dim, spec.conv_alpha if spec.conv_alpha is not None else spec.alpha


def _kohya_dims(spec: NetworkSpec, is_linear_like: bool, lora_name: str, arch: str) -> tuple[int, float] | None:
    """networks.lora's (dim, alpha): per-block ranks when `block_dims` is set (UNet only); 3x3 convs
    only when conv_dim or conv_block_dims asks for them, at conv_alpha (default 1.0)."""
    conv_alpha = spec.conv_alpha if spec.conv_alpha is not None else 1.0
    if spec.block_dims is not None and lora_name.startswith(keys.UNET_PREFIX):
        index = keys.block_index(lora_name, arch)
        if is_linear_like:
            alphas = spec.block_alphas
            dim, alpha = spec.block_dims[index], alphas[index] if alphas is not None else spec.alpha
        else:
            convs = spec.conv_block_dims if spec.conv_block_dims is not None else (
                [spec.conv_dim] * len(spec.block_dims) if spec.conv_dim else None)
            if convs is None:
                return None
            calphas = spec.conv_block_alphas
            dim, alpha = convs[index], calphas[index] if calphas is not None else conv_alpha
    elif not is_linear_like:
        if not spec.conv_dim:
            return None
        dim, alpha = spec.conv_dim, conv_alpha
    else:
        dim, alpha = spec.dim, spec.alpha
    return (dim, alpha) if dim else None


def _preset_for(spec: NetworkSpec) -> Preset:
    if spec.module == "networks.lora":
        unet = ("Transformer2DModel", *RESNET_BLOCKS) if (spec.conv_dim or spec.conv_block_dims) else ("Transformer2DModel",)
        return Preset(unet, conv=True)
    if spec.algo == "ia3":
        return IA3_PRESET
    preset = PRESETS[spec.preset]
    if spec.algo == "glora":
        preset = Preset(GLORA_UNET_CLASSES, (), preset.te_classes, preset.te_names, preset.conv)
    return preset


def _targets(spec: NetworkSpec, preset: Preset, root: nn.Module, classes, names, name_of, arch: str, *,
             suffix_names: bool) -> list[_Target]:
    train_norm = spec.train_norm and spec.module == "lycoris.kohya"
    out = []
    for path, module in _walk(root, classes, names, suffix_names=suffix_names):
        if train_norm and _is_norm(module):
            out.append(_Target(path, module, name_of(path), 0, 0.0, {}))
            continue
        if not (isinstance(module, nn.Linear) or _is_conv(module)):
            continue
        if _is_conv(module) and module.kernel_size[0] != 1 and not preset.conv:
            continue
        lora_name = name_of(path)
        dims = _dims_for(spec, module, lora_name, arch)
        if dims is None:
            continue
        options = next((o for suffix, o in preset.options_by_suffix.items() if path.endswith(suffix)), {})
        out.append(_Target(path, module, lora_name, dims[0], dims[1], dict(options)))
    return out


def _check_block_counts(spec: NetworkSpec, arch: str) -> None:
    """Per-block lists against the loaded model's architecture: the spec check compares them with
    `model.arch`, but a network is built for the model actually loaded."""
    for field_name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(spec, field_name)
        if values is not None and len(values) != keys.block_count(arch):
            raise JobFailure(Reason.SPEC_INVALID, f"network.{field_name} has {len(values)} values; {arch} needs "
                             f"{keys.block_count(arch)} (one per sd-scripts block)")


def build_network(network_spec: NetworkSpec, parts, *, train_unet: bool, train_text_encoder: bool) -> AdapterNetwork:
    """The adapter network for `network_spec` on `parts` (not yet hooked in: call `apply_to`)."""
    os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")
    arch = parts.arch
    _check_block_counts(network_spec, arch)
    preset = _preset_for(network_spec)
    targets: list[_Target] = []
    unet_names: set[str] = set()
    te_names: list[set[str]] = [set() for _ in parts.text_encoders]
    suffix_names = preset is IA3_PRESET
    if train_unet:
        unet_config = dict(parts.unet.config)
        found = _targets(network_spec, preset, parts.unet, preset.unet_classes, preset.unet_names,
                         lambda p: keys.sd_scripts_unet_name(p, arch, unet_config=unet_config), arch,
                         suffix_names=suffix_names)
        targets += found
        unet_names = {t.lora_name for t in found}
    if train_text_encoder:
        for index, te in enumerate(parts.text_encoders):
            found = _targets(network_spec, preset, te, preset.te_classes, preset.te_names,
                             lambda p, i=index: keys.sd_scripts_text_encoder_name(p, arch, i), arch,
                             suffix_names=suffix_names)
            targets += found
            te_names[index] = {t.lora_name for t in found}
    if not targets:
        raise JobFailure(Reason.SPEC_INVALID, "the network covers no layer: check network.preset, "
                         "train_unet_only/train_text_encoder_only and block_dims")
    names = [t.lora_name for t in targets]
    if len(set(names)) != len(names):
        raise RuntimeError("duplicated adapter module names")  # a mapping bug, never user input
    return AdapterNetwork(network_spec, parts, targets, unet_names, te_names)
