"""A `kind = "grid"` job with the REAL trainer on the tiny SD1 model: two adapters × three weights for
one prompt give a labelled grid PNG, the six single images and a grid.json naming every cell; the
adapter really changes the images, more with a larger weight, and the base is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainer.models.merge import MergeInput, merge_checkpoint
from trainer.models.load import load_model
from trainer.sampling.samples import pipeline_for, render_image
from trainer.core.spec import ModelSpec, parse_sample_prompt
from trainer.job.run import run_job
from trainer.shrink.base_model import BaseModel

pytestmark = pytest.mark.slow


def _lora(base: BaseModel, names: list[str], seed: int, path) -> None:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        o, i = base.shape(n)[:2]
        out[n + ".lora_down.weight"] = torch.randn(4, i, generator=g)
        out[n + ".lora_up.weight"] = torch.randn(o, 4, generator=g)
        out[n + ".alpha"] = torch.tensor(4.0)
    save_file(out, str(path))


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_pipeline):
    root = tmp_path_factory.mktemp("grid")
    single = tiny_pipeline("sd1", single_file=True, seed=1)
    base = BaseModel(single)
    names = sorted(n for n in base._index if n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_"))
                   and n.endswith(("attn1_to_q", "attn2_to_k", "attn2_to_v", "self_attn_v_proj")))
    assert names
    _lora(base, names, 1, root / "run-000001.safetensors")
    _lora(base, names, 2, root / "run.safetensors")
    return root, single


def _spec(root, single, **grid) -> dict:
    return {"version": 1, "kind": "grid", "name": "grid",
            "model": {"uri": single, "arch": "sd1"},
            "grid": {"adapters": [{"uri": str(root / "run-000001.safetensors")}, {"uri": str(root / "run.safetensors")}],
                     "prompts": ["a photo of a cat --w 64 --h 64 --s 2 --l 5 --d 7"], **grid},
            "save": {"output_name": "grid"}, "resources": {"gpus": 0, "max_attempts": 1}}


def test_grid_job_renders_saves_by_weights(assets, tmp_path):
    root, single = assets
    job = tmp_path / "job"
    job.mkdir()
    spec = _spec(root, single, x="weight", y="saves", weights=[0.0, 1.0, 2.0])
    (job / "spec.json").write_text(json.dumps(spec))
    assert run_job(str(job / "spec.json"), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache")) == 0
    out = job / "output" / "grid"
    record = json.loads((out / "grid.json").read_text())
    assert record["x"] == {"axis": "weight", "labels": ["0", "1", "2"]}
    assert record["y"] == {"axis": "saves", "labels": ["run-000001", "run"]}
    cells = record["prompts"][0]["cells"]
    assert len(cells) == 6 and {(c["row"], c["column"]) for c in cells} == {(r, c) for r in range(2) for c in range(3)}
    assert all(c["seed"] == 7 for c in cells)
    grid = Image.open(out / record["prompts"][0]["grid"])
    assert grid.width >= 3 * 64 and grid.height >= 2 * 64
    px = {(c["row"], c["column"]): np.asarray(Image.open(out / c["file"]), dtype=np.float32) for c in cells}
    assert all(p.shape == (64, 64, 3) for p in px.values())
    # weight 0 is the base for both saves; each weight and each save gives its own image.
    assert np.array_equal(px[(0, 0)], px[(1, 0)])
    for row in range(2):
        assert not np.array_equal(px[(row, 1)], px[(row, 0)]) and not np.array_equal(px[(row, 2)], px[(row, 1)])
    assert not np.array_equal(px[(0, 2)], px[(1, 2)])
    # A cell at weight w is what the base merged with that save at ratio w renders (same seed, sampler).
    merged = Path(single).with_name("merged-for-grid-test.safetensors")  # beside the tokenizer folders
    merge_checkpoint(single, [MergeInput(str(root / "run.safetensors"), 2.0)], str(merged), arch="sd1")
    parts = load_model(ModelSpec(uri=str(merged), arch="sd1"), weight_dtype=torch.float32)
    opts = parse_sample_prompt(spec["grid"]["prompts"][0])
    with pipeline_for(parts, "ddim") as pipe:
        want = np.asarray(render_image(pipe, parts, opts, 7, None), dtype=np.float32)
    assert np.abs(want - px[(1, 2)]).max() <= 2.0, np.abs(want - px[(1, 2)]).max()  # 8-bit pixels, fp32 round-off
    meta = json.loads((job / "output" / "metadata.json").read_text())
    assert meta["kind"] == "grid" and meta["grid"]["cells"] == 6 and len(meta["base_model_sha256"]) == 64


def test_grid_job_over_seeds_and_a_mismatched_adapter(assets, tmp_path):
    root, single = assets
    job = tmp_path / "job"
    job.mkdir()
    spec = _spec(root, single, x="seed", y="saves", seeds=[1, 2])
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_not_a_layer.lora_down.weight": torch.ones(2, 8),
               "lora_unet_not_a_layer.lora_up.weight": torch.ones(8, 2)}, str(bad))
    spec["grid"]["adapters"].append({"uri": str(bad), "label": "bad"})
    (job / "spec.json").write_text(json.dumps(spec))
    from trainer.core.failures import EXIT_CODES, Reason

    code = run_job(str(job / "spec.json"), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache"))
    assert code == EXIT_CODES[Reason.ADAPTER_MISMATCH]
    status = json.loads((job / "status.json").read_text())
    assert status["error"]["reason"] == "adapter_mismatch" and "lora_unet_not_a_layer" in status["error"]["message"]


def test_training_with_sample_grid_renders_its_saves_by_three_weights(assets, tmp_path):
    """save_every_n_epochs = 1 over 2 epochs: the epoch-1 save and the final file, each at 3 weights."""
    from trainer.tools.tinydata import make_tiny_dataset

    root, single = assets
    make_tiny_dataset(tmp_path / "data", images=2, size=(64, 64), concepts=(("circle", 1),), missing_caption_every=0)
    job = tmp_path / "job"
    job.mkdir()
    spec = {"version": 1, "name": "own-grid", "model": {"uri": single, "arch": "sd1"},
            "dataset": {"uri": str(tmp_path / "data"), "resolution": 64, "caption_extension": ".txt"},
            "training": {"max_train_epochs": 2, "batch_size": 2},
            "save": {"output_name": "run", "save_every_n_epochs": 1},
            "shrink": {"enabled": False},
            "sample": {"prompts": ["a circle --w 64 --h 64 --s 2 --d 3"],
                       "grid": {"x": "weight", "y": "saves", "weights": [0.5, 1.0, 1.5]}},
            "resources": {"gpus": 0, "max_attempts": 1}}
    (job / "spec.json").write_text(json.dumps(spec))
    assert run_job(str(job / "spec.json"), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache")) == 0
    out = job / "output"
    record = json.loads((out / "grid" / "grid.json").read_text())
    assert record["y"] == {"axis": "saves", "labels": ["run-000001", "run"]}
    assert record["x"]["labels"] == ["0.5", "1", "1.5"]
    assert len(record["prompts"][0]["cells"]) == 6 and (out / "grid" / "grid-0.png").is_file()
    status = json.loads((job / "status.json").read_text())
    kinds = {o["name"]: o["kind"] for o in status["outputs"]}
    assert kinds["grid/grid-0.png"] == "grid" and kinds["grid/grid.json"] == "grid"
    assert sum(k == "sample" and n.startswith("grid/cells/") for n, k in kinds.items()) == 6
    assert not [w for w in status.get("warnings", []) if "sample.grid" in w]
