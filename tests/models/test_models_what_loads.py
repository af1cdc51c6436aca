"""What is trained is what loads: for every algo and option, each adapted layer's training forward
changes the layer exactly as the saved file does when read by the readers' formulas (ComfyUI's
`weight_adapter`, A1111's `network_*.py`), restated here independently of LyCORIS:
- LoRA/LoCon/DyLoRA: ΔW = up·down·alpha/rank, a Tucker `lora_mid` between them;
- LoHa: ΔW = (w1a·w1b)⊙(w2a·w2b)·alpha/rank, Tucker `hada_t1/t2`;
- LoKr: ΔW = kron(w1, w2)·alpha/rank (scale 1 when both halves are full), factored and Tucker halves;
- full: ΔW = diff, Δb = diff_b; norms: Δw = w_norm, Δb = b_norm; IA3: ΔW = W·weight per channel;
- GLoRA: ΔW = (W·a1·a2 + b1·b2)·alpha/rank; OFT/BOFT: W rotated by Cayley transforms of `oft_blocks`.
A LyCORIS upgrade that changes a scale convention fails here. The shrink keeps the property: a shrunk
file read the same way differs from its input by exactly the error the shrink reports."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainer.models.adapter_file import save_adapter
from trainer.core.spec import NetworkSpec
from trainer.models.network import build_network

CASES = {
    "networks.lora": dict(module="networks.lora", dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0),
    "lora": dict(algo="lora", dim=4, alpha=2.0),
    "locon-tucker": dict(algo="locon", dim=4, alpha=2.0, conv_dim=2, conv_alpha=3.0, use_tucker=True),
    "loha": dict(algo="loha", dim=4, alpha=2.0),
    "loha-tucker": dict(algo="loha", dim=2, alpha=3.0, use_tucker=True),
    "lokr": dict(algo="lokr", dim=4, alpha=2.0, factor=4),
    "lokr-tucker-both": dict(algo="lokr", dim=2, alpha=3.0, factor=8, use_tucker=True, decompose_both=True),
    "lokr-scalar": dict(algo="lokr", dim=2, alpha=1.0, factor=-1, use_scalar=True),
    "full": dict(algo="full"),
    "dylora": dict(algo="dylora", dim=8, alpha=4.0, block_size=4),
    "dylora-block1": dict(algo="dylora", dim=4, alpha=4.0, block_size=1),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora", dim=4, alpha=2.0),
    "diag-oft": dict(algo="diag-oft", dim=4, alpha=2.0, factor=4),
    "boft": dict(algo="boft", dim=4, alpha=2.0, factor=4),
    "train_norm": dict(algo="lora", dim=4, alpha=2.0, train_norm=True),
}


def _reader_delta(t: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δbias) of one layer from its saved tensors, as the readers compute them."""
    t = {k: v.double() for k, v in t.items()}
    shape = weight.shape
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in t:
            delta = torch.einsum("m n k l, o m, n i -> o i k l", t["lora_mid.weight"], up.flatten(1), down.flatten(1))
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        return delta * alpha / rank, None
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]

        def half(i: int) -> torch.Tensor:
            a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            if f"hada_t{i}" in t:
                return torch.einsum("i j k l, j r, i p -> p r k l", t[f"hada_t{i}"], b, a)
            return (a @ b).reshape(shape)

        return half(1) * half(2) * alpha / rank, None
    if any(k.startswith("lokr_") for k in t):
        rank = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            rank = t["lokr_w2_b"].shape[0]
            if "lokr_t2" in t:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / rank if rank is not None else 1.0
        return torch.kron(w1, w2.contiguous()).reshape(shape) * scale, None
    if "diff" in t:
        return t["diff"], t.get("diff_b")
    if "w_norm" in t:
        return t["w_norm"], t.get("b_norm")
    if "on_input" in t:  # IA3 (A1111 network_ia3.py): scale the weight per output, or per input, channel
        w = t["weight"].flatten()
        per = w.reshape(1, -1) if bool(t["on_input"]) else w.reshape(-1, 1)
        return weight.double() * per.reshape(*per.shape, *[1] * (weight.dim() - 2)), None
    if "a1.weight" in t:  # GLoRA (ComfyUI weight_adapter/glora.py): (W·a1·a2 + b1·b2)·alpha/rank
        a1, a2, b1, b2 = (t[f"{k}.weight"].flatten(1) for k in ("a1", "a2", "b1", "b2"))
        through_a = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", weight.double(), a1), a2)
        return (through_a + (b1 @ b2).reshape(shape)) * alpha / a2.shape[0], None
    if "oft_blocks" in t:  # (B)OFT (ComfyUI weight_adapter/oft.py, boft.py): W rotated by the Cayley transforms
        blocks = t["oft_blocks"]
        q = blocks - blocks.transpose(-1, -2)
        if alpha and alpha > 0 and q.norm() + 1e-8 > alpha:
            q = q * alpha / (q.norm() + 1e-8)
        eye = torch.eye(blocks.shape[-1], dtype=q.dtype)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        w = weight.double()
        if blocks.dim() == 3:
            rotated = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(blocks.shape[0], blocks.shape[1], *shape[1:]))
        else:
            rotated, half = w, blocks.shape[-1] // 2
            for i in range(blocks.shape[0]):  # butterfly stage i pairs rows 2**i·half apart
                step = 2 ** i * half
                rotated = rotated.unflatten(0, (-1, 2, step)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, blocks.shape[-1]))
                rotated = torch.einsum("b i j, b j ... -> b i ...", r[i], rotated)
                rotated = rotated.flatten(0, 1).unflatten(0, (-1, step, 2)).transpose(1, 2).flatten(0, 2)
        if "rescale" in t:
            rotated = rotated * t["rescale"]
        return rotated.reshape(shape) - w, None
    raise AssertionError(f"no reader formula for {sorted(t)}")


def _layer_output(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, torch.nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if isinstance(layer, torch.nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    raise AssertionError(f"no probe for {type(layer).__name__}")


def _probe_input(layer: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, 3, layer.in_features, generator=g)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(1, layer.in_channels, 6, 6, generator=g)
    if isinstance(layer, torch.nn.GroupNorm):
        return torch.randn(1, layer.num_channels, 4, 4, generator=g)
    return torch.randn(2, 3, *layer.normalized_shape, generator=g)


@contextmanager
def _hooked(network):
    """The network hooked into its layers, unhooked on leaving: the tiny models are shared by the session."""
    network.apply_to()
    try:
        yield network
    finally:
        network.restore()


@contextmanager
def _trained(spec, parts, *, text_encoder: bool = True):
    """(network hooked in with every trainable tensor random, as after training; each adapted layer's bare
    (weight, bias)). LyCORIS' full module takes the weight off its layer while hooked in, so the bare
    weights are read first; files are saved while hooked in, as the trainer saves them."""
    network = build_network(spec, parts, train_unet=True, train_text_encoder=text_encoder)
    bare = {name: (m.org_module[0].weight.detach().clone(),
                   None if m.org_module[0].bias is None else m.org_module[0].bias.detach().clone())
            for name, m in network.named_children()}
    with _hooked(network):
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in network.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 if not name.endswith("scalar") else torch.tensor(1.5))
        yield network, bare


def _saved(network, path) -> dict[str, torch.Tensor]:
    save_adapter(network.state_dict_for_save(torch.float32), str(path), metadata={}, dtype=torch.float32)
    return load_file(str(path))


def _check_layers(network, bare, saved: dict[str, torch.Tensor], *, truncate: int | None = None) -> int:
    """Probe every adapted layer of the hooked-in `network`: the training forward's change against the
    reader's change from `saved`, to fp32 round-off. Returns the number of layers."""
    g = torch.Generator().manual_seed(11)
    by_module = _by_module(saved)
    assert set(by_module) == {name for name, _ in network.named_children()}
    network.train()
    inert = 0
    for name, module in network.named_children():
        layer = module.org_module[0]
        tensors = by_module[name]
        if truncate is not None:  # a DyLoRA file read at its first `truncate` ranks
            tensors = dict(tensors, **{"lora_down.weight": tensors["lora_down.weight"][:truncate],
                                       "lora_up.weight": tensors["lora_up.weight"][:, :truncate]})
        x = _probe_input(layer, g)
        weight, bias = bare[name]
        with torch.no_grad():
            bare_out = _layer_output(layer, x, weight, bias)
            trained = layer(x).double() - bare_out.double()
            d_weight, d_bias = _reader_delta(tensors, weight)
            bias64 = None if bias is None else bias.double()
            new_bias = None if bias is None else bias64 + (d_bias if d_bias is not None else 0)
            read = (_layer_output(layer, x.double(), weight.double() + d_weight, new_bias)
                    - _layer_output(layer, x.double(), weight.double(), bias64))
        # fp32 round-off of the layer's output bounds the error; the change must stand far above it
        size, err = read.abs().max().item(), (trained - read).abs().max().item()
        reference = max(size, bare_out.abs().max().item())
        assert err <= 1e-5 * reference, f"{name}: trained change differs from the file's by {err:.3g} (size {size:.3g})"
        # A change far above round-off, so that the check could fail (OFT on 4 channels rotates 1x1 blocks: none)
        inert += size <= 1e-3 * reference
    assert inert <= len(by_module) // 20, f"{inert} of {len(by_module)} layers change too little to check"
    return len(by_module)


def _full_rank(network) -> None:
    """Make each DyLoRA module's training forward use all its blocks (LyCORIS picks a random count each step)."""
    for m in network.children():
        m.get_random_rank_weight = lambda m=m: m.get_weight((m.block_count - 1) * m.block_size)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_trained_change_is_what_the_saved_file_applies(parts_for, tmp_path, arch, case):
    spec = NetworkSpec(**CASES[case])
    with _trained(spec, parts_for(arch)) as (network, bare):
        if spec.algo == "dylora":
            _full_rank(network)
        saved = _saved(network, tmp_path / f"{case}.safetensors")
        if spec.algo == "lokr" and spec.use_tucker:
            # ComfyUI cannot kron its own Tucker rebuild (trainer.models.adapter_layout): plain factored conv halves instead
            assert not any(k.endswith(".lokr_t2") for k in saved)
            tucker_convs = [n for n, m in network.named_children() if m.tucker and not m.use_w2]
            assert tucker_convs and all(saved[f"{n}.lokr_w2_b"].shape[0] == spec.dim for n in tucker_convs)
        assert _check_layers(network, bare, saved) > 10


def test_a_dylora_file_read_at_fewer_ranks_applies_what_training_applied_with_fewer_blocks(parts_for, tmp_path):
    """Truncating a saved DyLoRA to its first k·block_size ranks (sd-scripts' extract_lora_from_dylora,
    alpha kept) gives what training applied with k blocks."""
    spec = NetworkSpec(algo="dylora", dim=12, alpha=6.0, block_size=4)
    with _trained(spec, parts_for("sd1"), text_encoder=False) as (network, bare):
        saved = _saved(network, tmp_path / "dylora.safetensors")
        for blocks in (1, 2, 3):
            for m in network.children():
                m.get_random_rank_weight = lambda m=m, b=blocks: m.get_weight((b - 1) * m.block_size)
            _check_layers(network, bare, saved, truncate=blocks * 4)


@pytest.mark.parametrize("case", ["lokr-tucker-both", "dylora"])
def test_continuing_from_a_saved_file_restores_the_trained_modules(parts_for, tmp_path, case):
    """`network.weights` reads the file layout back into the training form: the same change per layer."""
    parts, spec, path = parts_for("sd1"), NetworkSpec(**CASES[case]), tmp_path / f"{case}.safetensors"
    with _trained(spec, parts, text_encoder=False) as (network, bare):
        saved = _saved(network, path)
    again = build_network(spec, parts, train_unet=True, train_text_encoder=False)
    again.load_weights(str(path))
    if spec.algo == "dylora":
        _full_rank(again)
    with _hooked(again):
        _check_layers(again, bare, saved)


@pytest.mark.parametrize("case", ["lora", "locon-tucker", "loha", "lokr-tucker-both", "dylora", "full"])
def test_a_shrunk_file_applies_the_change_the_shrink_reports(parts_for, tmp_path, case):
    from trainer.shrink.pipeline import shrink_file

    path, out = tmp_path / f"{case}.safetensors", tmp_path / f"{case}-shrunk.safetensors"
    with _trained(NetworkSpec(**CASES[case]), parts_for("sd1")) as (network, bare):
        before = _by_module(_saved(network, path))
    report = shrink_file(str(path), str(out), base=None, rank=2, save_precision="fp32")
    after = _by_module(load_file(str(out)))
    rows = {row.name: row for row in report.layers}
    assert rows and set(rows) <= set(before)
    for name, row in rows.items():
        weight = bare[name][0]
        full = _reader_delta(before[name], weight)[0]
        if row.new_rank == 0:
            assert name not in after
            continue
        kept = _reader_delta(after[name], weight)[0]
        assert after[name]["lora_down.weight"].shape[0] == row.new_rank
        norm = full.norm().item()
        assert (kept - full).norm().item() / norm == pytest.approx(row.rel_error, abs=1e-5), name
        assert kept.norm().item() / norm == pytest.approx(row.retained_fro, abs=1e-5), name


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        out.setdefault(name, {})[suffix] = value
    return out


def test_the_loader_table_knows_which_presets_have_3x3_convs():
    from trainer.core.loaders import CONV_PRESETS
    from trainer.models.network import PRESETS

    assert CONV_PRESETS == {name for name, preset in PRESETS.items() if preset.conv}


@pytest.mark.parametrize("case", ["dylora", "full", "lokr-scalar", "lokr-tucker-both"])
def test_resuming_from_a_checkpoint_restores_the_trained_modules(parts_for, tmp_path, case):
    """A resumable checkpoint holds the network's `state_dict()`; loading it into a fresh network (as a
    resumed job does, hooked in) gives every layer its trained change again. DyLoRA needs its own split."""
    parts, spec = parts_for("sd1"), NetworkSpec(**CASES[case])
    with _trained(spec, parts, text_encoder=False) as (network, bare):
        checkpoint = {k: v.detach().clone() for k, v in network.state_dict().items()}
        saved = _saved(network, tmp_path / f"{case}.safetensors")
    again = build_network(spec, parts, train_unet=True, train_text_encoder=False)
    if spec.algo == "dylora":
        _full_rank(again)
    with _hooked(again):
        assert again.load_training_weights(checkpoint) == ([], [])
        _check_layers(again, bare, saved)
