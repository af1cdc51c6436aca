"""The factored deltas equal what LyCORIS applies, and their SVD equals a full SVD of the dense delta."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lycoris.modules import FullModule, LoConModule, LohaModule, LokrModule
from shrink_fixtures import applied_delta, lycoris_state_dict, randomize

from trainer.shrink.adapter_layers import materialize, parse_adapter, resolve_shape, spectrum_of

LINEAR = ("linear", lambda: nn.Linear(48, 40))
CONV = ("conv3x3", lambda: nn.Conv2d(24, 32, 3, padding=1))
CONV1 = ("conv1x1", lambda: nn.Conv2d(24, 32, 1))
BIG_LINEAR = ("linear256", lambda: nn.Linear(256, 256))
BIG_CONV = ("conv64", lambda: nn.Conv2d(64, 64, 3, padding=1))

CASES = [
    ("lora", LoConModule, LINEAR, dict(lora_dim=4, alpha=2)),
    ("locon", LoConModule, CONV, dict(lora_dim=4, alpha=2)),
    ("locon-1x1", LoConModule, CONV1, dict(lora_dim=4, alpha=8)),
    ("locon-tucker", LoConModule, CONV, dict(lora_dim=4, alpha=2, use_tucker=True)),
    ("lora-scalar", LoConModule, LINEAR, dict(lora_dim=4, alpha=3, use_scalar=True)),
    ("loha", LohaModule, LINEAR, dict(lora_dim=4, alpha=2)),
    ("loha-conv", LohaModule, CONV, dict(lora_dim=4, alpha=2)),
    ("loha-tucker", LohaModule, CONV, dict(lora_dim=4, alpha=2, use_tucker=True)),
    ("lokr", LokrModule, LINEAR, dict(lora_dim=4, alpha=2, factor=4)),
    ("lokr-both", LokrModule, BIG_LINEAR, dict(lora_dim=2, alpha=3, factor=16, decompose_both=True)),
    ("lokr-full", LokrModule, LINEAR, dict(lora_dim=4, alpha=2, factor=4, full_matrix=True)),
    ("lokr-conv", LokrModule, CONV, dict(lora_dim=2, alpha=2, factor=4)),
    ("lokr-tucker", LokrModule, BIG_CONV, dict(lora_dim=2, alpha=2, factor=2, use_tucker=True)),
    ("full", FullModule, LINEAR, dict()),
    ("full-conv", FullModule, CONV, dict()),
]


def _layer(cls, make_org, kwargs, name="lora_unet_down_blocks_0_resnets_0_conv1"):
    torch.manual_seed(0)
    org = make_org()
    module = cls(name if isinstance(org, nn.Conv2d) else "lora_unet_mid_block_attentions_0_proj_in", org, **kwargs)
    randomize(module)
    if kwargs.get("use_scalar"):
        with torch.no_grad():
            module.scalar.fill_(0.7)
    w0 = org.weight.detach().clone()
    if cls is FullModule:
        module.apply_to()  # LyCORIS computes a full layer's `diff` against the weight it took over
    tensors = lycoris_state_dict(module)
    parsed = parse_adapter(tensors)
    layer = parsed.layers[0]
    base_shape = tuple(w0.shape) if w0.shape[2:] == (1, 1) else None
    resolve_shape(layer, base_shape, "sd2", "test")
    return module, org, layer, w0


@pytest.mark.parametrize("label,cls,org,kwargs", CASES, ids=[c[0] for c in CASES])
def test_delta_equals_lycoris_and_svd_is_exact(label, cls, org, kwargs):
    module, org_module, layer, w0 = _layer(cls, org[1], kwargs)
    org_shape = tuple(w0.shape)
    structure = layer.structure()
    ours = materialize(structure).reshape(layer.weight_shape)
    applied = applied_delta(module, org_module, w0, applied=cls is FullModule)
    assert tuple(ours.shape) == org_shape
    torch.testing.assert_close(ours, applied, rtol=1e-4, atol=1e-5 * applied.abs().max().item())

    dense = materialize(structure).double()
    reference = torch.linalg.svdvals(dense)
    spectrum = spectrum_of(structure)
    n = len(spectrum.S)
    assert n <= len(reference)
    # σ equal a full SVD of the dense delta to fp32 round-off; the ones we do not list are zero.
    tol = 1e-5 * reference[0].item()
    assert (spectrum.S.double() - reference[:n]).abs().max().item() < tol
    assert reference[n:].abs().max().item() < tol if n < len(reference) else True
    # Singular vectors rebuild the delta: every component, and each best rank-k truncation.
    every = torch.arange(n)
    u, vh = spectrum.vectors(every)
    rebuilt = (u * spectrum.S) @ vh
    assert (rebuilt.double() - dense).norm() / dense.norm() < 1e-5
    k = max(1, n // 3)
    u, vh = spectrum.vectors(torch.arange(k))
    truncated = (u * spectrum.S[:k]) @ vh
    best = (reference[k:] ** 2).sum().sqrt() / reference.norm()
    err = (truncated.double() - dense).norm() / dense.norm()
    assert abs(err.item() - best.item()) < 1e-5


def _factors(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    left = torch.randn(300, 16, generator=g)
    right = torch.randn(16, 200, generator=g)
    if kind == "decaying":
        # A trained LoRA's spectrum: column norms of `up` spread over 6 decades (κ ≈ 1e6), while the
        # unit-norm columns stay well-conditioned: the float32 Gram keeps every σ to round-off.
        left = left * torch.logspace(0, -6, 16)
    elif kind == "correlated":
        left[:, 1] = left[:, 0] + 0.05 * left[:, 1]  # two nearly parallel columns: κ ≈ 40 after scaling
    elif kind == "deficient":
        left = torch.randn(300, 5, generator=g) @ torch.randn(5, 16, generator=g)
    return left, right


@pytest.mark.parametrize(
    "kind,route",
    [("random", "gram32"), ("decaying", "gram32"), ("correlated", "gram64"), ("deficient", "qr")],
)
def test_product_spectrum_routes_are_exact(kind, route):
    """Factors well-conditioned once their columns are normalised take the float32 Gram, worse ones
    the float64 Gram, rank-deficient ones Householder QR; all agree with a float64 SVD of ΔW."""
    from trainer.shrink.spectrum import product_spectra, product_spectrum

    left, right = _factors(kind)
    spec = product_spectrum(left, right, scale=-0.25)
    assert spec.mode == route
    dense = -0.25 * left.double() @ right.double()
    reference = torch.linalg.svdvals(dense)
    assert (spec.S.double() - reference[:16]).abs().max() < 1e-6 * reference[0]
    if kind == "decaying":  # each σ to round-off of itself, not only of σ₀
        assert ((spec.S.double() - reference[:16]).abs() / reference[:16]).max() < 2e-5
    k = 5
    u, vh = spec.vectors(torch.arange(k))
    best = (reference[k:] ** 2).sum().sqrt() / reference.norm()
    err = ((u * spec.S[:k]) @ vh).double().sub(dense).norm() / dense.norm()
    assert abs(err - best) < 1e-6
    # Batched with other products (and in fp16, as files store them) it is the same decomposition.
    batch = product_spectra([(left.half(), right.half(), -0.25), (left.half() * 3, right.half(), 1.0)])
    half = torch.linalg.svdvals(-0.25 * left.half().double() @ right.half().double())
    assert batch[0].mode == route and batch[0].S.dtype == torch.float32
    assert (batch[0].S.double() - half[:16]).abs().max() < 1e-6 * half[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_spectrum_matches_cpu():
    module, _, layer, _ = _layer(LohaModule, CONV[1], dict(lora_dim=4, alpha=2))
    on_cpu = spectrum_of(layer.structure("cpu")).S
    on_gpu = spectrum_of(layer.structure("cuda")).S.cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-6 * float(on_cpu[0]))


def test_batched_kept_factors_equal_each_spectrums_own_vectors():
    """`kept_factors` forms Gram-route layers of one shape together (kept columns padded, layers sorted by
    width); every layer must get exactly what its own `vectors(idx, weights)` gives, whatever its route,
    its kept indices (in any order, any count, none) or the sign of its scale."""
    from trainer.shrink.spectrum import kept_factors, product_spectra

    g = torch.Generator().manual_seed(5)
    products = []
    for i in range(7):  # one shape, so the Gram-route ones share batches
        left, right = torch.randn(120, 8, generator=g), torch.randn(8, 90, generator=g)
        if i == 3:
            left[:, 1] = left[:, 0] + 0.05 * left[:, 1]  # too ill-conditioned for float32: float64 Gram
        products.append((left.half(), right.half(), -0.5 if i % 2 else 2.0))
    products.append((torch.randn(6, 8, generator=g), torch.randn(8, 5, generator=g), 1.0))  # dense route
    spectra = product_spectra(products)
    assert {s.mode for s in spectra} >= {"gram32", "gram64", "dense"}
    picks = [[0, 1, 2], [4, 0], [], [0, 2, 5, 7], list(range(8)), [3], [6, 1, 0], [0, 1]]
    requests = []
    for spec, pick in zip(spectra, picks):
        idx = torch.tensor(pick, dtype=torch.long)
        requests.append((spec, idx, torch.sqrt(spec.S[idx])))
    batched = kept_factors(requests, torch.float32)
    for (spec, idx, weights), (u, vh) in zip(requests, batched):
        ref_u, ref_vh = spec.vectors(idx, weights)
        assert u.shape == ref_u.shape and vh.shape == ref_vh.shape
        torch.testing.assert_close(u, ref_u.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vh, ref_vh.float(), rtol=1e-5, atol=1e-6)
        assert u.is_contiguous() and vh.is_contiguous()
    storages = [t.untyped_storage().data_ptr() for pair in batched for t in pair if t.numel()]
    assert len(storages) == len(set(storages))  # safetensors refuses tensors that share memory


def test_one_pass_reduction_equals_spectra_then_kept_factors():
    """`reduce_products` (decide and re-form each batch in one pass, on the batch's own float32 factors)
    gives every product the spectrum and factors of `product_spectra` followed by `kept_factors`, and
    calls `select` with the right positions, whatever the product's route."""
    from trainer.shrink.spectrum import kept_factors, product_spectra, reduce_products

    g = torch.Generator().manual_seed(11)
    products = []
    for i in range(9):  # two shapes; one ill-conditioned factor; one dense-route product
        m = 120 if i % 2 else 64
        left, right = torch.randn(m, 8, generator=g), torch.randn(8, 90, generator=g)
        if i == 4:
            left[:, 1] = left[:, 0] + 0.05 * left[:, 1]
        products.append((left.half(), right.half(), -0.5 if i % 3 == 0 else 1.5))
    products.append((torch.randn(6, 8, generator=g), torch.randn(8, 5, generator=g), 1.0))
    picks = {i: torch.arange(i % 5) for i in range(len(products))}  # 0..4 components, so some keep none
    seen = []

    def select(positions, spectra):
        seen.extend(positions)
        return [(picks[p], torch.sqrt(s.S[picks[p]])) for p, s in zip(positions, spectra)]

    one_pass = reduce_products(products, select, torch.float16)
    assert sorted(seen) == list(range(len(products)))
    spectra = product_spectra(products)
    assert {s.mode for s in spectra} >= {"gram32", "gram64", "dense"}
    two_pass = kept_factors([(s, picks[i], torch.sqrt(s.S[picks[i]])) for i, s in enumerate(spectra)], torch.float16)
    for (spec, (idx, _), (u, vh)), ref, (ref_u, ref_vh) in zip(one_pass, spectra, two_pass):
        assert spec.mode == ref.mode
        torch.testing.assert_close(spec.S, ref.S)
        assert u.dtype == vh.dtype == torch.float16 and u.is_contiguous() and vh.is_contiguous()
        torch.testing.assert_close(u, ref_u, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(vh, ref_vh, rtol=2e-3, atol=1e-4)
