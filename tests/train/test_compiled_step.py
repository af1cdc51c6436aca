"""The compiled training step, checked on CPU with the tiny models.

What is compiled is the step's forward and loss (`TrainingRecipe.loss_of`); AOTAutograd traces its
backward from it, so `fullgraph=True` holds forward and backward to one graph each. `aot_eager` traces
exactly what inductor would get without inductor's C++ build, which takes minutes on CPU. The images
are all one size, so each run has one bucket shape and compiles once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import load_everything, make_spec

from trainer.core.failures import JobFailure, Reason
from trainer.train.lossbuf import LossBuffer, first_bad_step

# Compiled against eager: aot_eager runs the same aten ops, but the traced graph may order the
# reductions of the backward differently, so weights agree to float32 rounding over a few steps.
LOSS_REL, WEIGHT_ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def square_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trainer.tools.tinydata import make_tiny_dataset

    root = tmp_path_factory.mktemp("square")
    make_tiny_dataset(root, images=4, size=(64, 64), concepts=(("circle", 1),), missing_caption_every=0)
    return str(root)


def _recipe(spec: Any, tmp: Path, seed: int = 1) -> Any:
    from accelerate.state import AcceleratorState

    from trainer.train.recipe import TrainingRecipe

    AcceleratorState._reset_state(reset_partial_state=True)
    parts, network, dataset = load_everything(spec, seed=seed)
    return TrainingRecipe(spec, parts, network, dataset, out_dir=str(tmp / "out"), work_dir=str(tmp / "work"),
                          seed=seed)


def _spec(model: str, data: str, arch: str, module: str, algo: str, *, compiled: bool, steps: int = 2,
          **optimizer: Any) -> Any:
    return make_spec(model, data, arch=arch, network={"module": module, "algo": algo, "train_unet_only": True},
                     precision={"torch_compile": compiled, "dynamo_backend": "aot_eager", "cache_latents": True,
                                "cache_text_encoder_outputs": True},
                     training={"max_train_steps": steps, "seed": 1}, optimizer={"learning_rate": 1e-3, **optimizer})


@pytest.mark.parametrize(("arch", "module", "algo"), [
    ("sd1", "networks.lora", "lora"), ("sd1", "lycoris.kohya", "locon"),
    # SDXL's tiny UNet takes ~50 s to trace on a shared CPU core.
    pytest.param("sdxl", "networks.lora", "lora", marks=pytest.mark.slow),
    pytest.param("sdxl", "lycoris.kohya", "lora", marks=pytest.mark.slow),
])
def test_the_step_compiles_into_one_graph_and_trains_as_eager(tiny_models, square_data, tmp_path, arch, module,
                                                               algo) -> None:
    """fullgraph=True on aot_eager with no graph break, the compile seconds in the timings, and the same
    losses and adapter weights as eager within LOSS_REL / WEIGHT_ATOL."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager = _recipe(_spec(tiny_models[arch], square_data, arch, module, algo, compiled=False), tmp_path / "eager")
    eager_result = eager.run()
    assert eager.compiled is None and "compile_s" not in eager_result.timings
    torch._dynamo.reset()
    counters.clear()
    compiled = _recipe(_spec(tiny_models[arch], square_data, arch, module, algo, compiled=True), tmp_path / "compiled")
    result = compiled.run()
    assert compiled.compiled is not None and counters["stats"]["unique_graphs"] >= 1
    assert dict(counters["graph_break"]) == {}
    assert result.timings["compile_s"] > 0
    assert result.loss_history == pytest.approx(eager_result.loss_history, rel=LOSS_REL)
    for (name, a), b in zip(eager.network.state_dict().items(), compiled.network.state_dict().values()):
        assert torch.allclose(a, b, atol=WEIGHT_ATOL), name
    torch._dynamo.reset()


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_no_host_synchronisation_between_flushes(tiny_models, square_data, tmp_path, implementation) -> None:
    """Over N steps with fused AdamW (what a CUDA job gets), gradient clipping and the constant scheduler,
    the steps dispatch no `aten._local_scalar_dense` (what `.item()`, `float(t)` and `bool(t)` become);
    the one flush at the end reads the N losses back. Foreach AdamW without `capturable` (which CPU
    tensors cannot have) reads each parameter's step count back for both bias corrections, two syncs per
    parameter tensor per step: that row shows the count sees what it should. Counted on the eager step: the compiled forward cannot
    add any, since with fullgraph=True an `.item()` in it would have been a graph break that the test
    above refuses."""
    from torch.utils._python_dispatch import TorchDispatchMode

    steps = 4
    recipe = _recipe(_spec(tiny_models["sd1"], square_data, "sd1", "networks.lora", "lora", compiled=False,
                           steps=steps, args={implementation: True}), tmp_path)
    recipe.setup()
    recipe.losses = LossBuffer(every=steps, max_age_s=None)
    syncs: list[str] = []

    class CountSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if func is torch.ops.aten._local_scalar_dense.default:
                syncs.append(func.name())
            return func(*args, **(kwargs or {}))

    def counted(method: Any) -> Any:
        def run(*args: Any) -> Any:
            with CountSyncs():
                return method(*args)
        return run

    recipe._accumulate = counted(recipe._accumulate)
    recipe._optimizer_step = counted(recipe._optimizer_step)
    flushed: list[int] = []
    flush = recipe.losses.flush
    recipe.losses.flush = lambda: flushed.append(len(recipe.losses.pending)) or flush()
    result = recipe.train()
    assert result.steps_done == steps and len(result.loss_history) == steps
    params = sum(len(g["params"]) for g in recipe.optimizer.param_groups)
    assert len(syncs) == (0 if implementation == "fused" else 2 * steps * params)
    assert flushed[0] == steps  # the first flush reads all N steps' losses at once


def test_the_flush_names_the_first_non_finite_step() -> None:
    buffer = LossBuffer(every=8, max_age_s=None)
    for step, value in ((1, 0.5), (2, float("nan")), (3, float("inf"))):
        buffer.push(step, torch.tensor([value]))
    assert not buffer.due()
    flushed = buffer.flush()
    assert [s for s, _ in flushed] == [1, 2, 3] and first_bad_step(flushed) == 2 and buffer.pending == []


def test_a_nan_found_at_a_flush_fails_with_the_step(tiny_models, square_data, tmp_path) -> None:
    spec = _spec(tiny_models["sd1"], square_data, "sd1", "networks.lora", "lora", compiled=False, steps=4,
                 max_grad_norm=0.0)
    recipe = _recipe(spec, tmp_path)
    recipe.setup()
    recipe.losses = LossBuffer(every=4, max_age_s=None)
    step = recipe.step
    recipe.step = lambda batch: step(batch) * (float("nan") if recipe.step_no == 1 else 1.0)
    with pytest.raises(JobFailure) as exc:
        recipe.train()
    assert exc.value.reason == Reason.NAN_LOSS and "at step 2;" in exc.value.message


def test_the_compile_cache_lives_under_the_model_cache(tmp_path, monkeypatch) -> None:
    from trainer.train.compiled import place_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/operator/triton")
    root = place_compile_cache(str(tmp_path))
    assert root == str(tmp_path / "compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/operator/triton"  # an operator's setting wins
