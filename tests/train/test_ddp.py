"""Two training processes on CPU (gloo), started the way production starts them.

service/launchers/k8s/manifests.py `trainer_command` runs `accelerate launch --multi_gpu --num_processes N … -m
trainer run SPEC`; here `accelerate launch --multi_gpu --num_processes 2` (on 127.0.0.1) starts
ddp_worker.py, which is `trainer run` with probes (see its docstring). One run, several checks:
- the adapter starts from the same seeded weights on both ranks, trains, and stays identical on both
  ranks bit for bit (gradients are all-reduced; ranks that skipped the sync would diverge, since they
  train on different images);
- the published adapter is exactly rank 0's weights, and only rank 0 writes adapter files;
- each rank trains on its own share of the epoch, together on every image once;
- sample images (at_first, every_n_steps, end of training) are split between the ranks, each prompt
  rendered once per round, and all of them listed in metadata.json, which rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from train_helpers import make_spec

from tests.common_helpers import free_port
from trainer.core.spec import encode_spec

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    "a red circle --n blurry --w 64 --h 64 --d 7 --l 5 --s 1",
    "a blue square --w 96 --h 64 --s 1",
    "a circle and a square --w 64 --h 96 --s 2",
]


@pytest.fixture(scope="module")
def ddp_run(tiny_models: dict[str, str], tiny_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    job, probe = root / "job", root / "probe"
    job.mkdir()
    # 6 images, batch 1, 2 processes: an epoch is 3 steps of 2 images. Samples at step 0 (at_first),
    # 2 (every_n_steps) and 3 (the end of training).
    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 3, "seed": 0},
                     resources={"gpus": 2}, logging={"log_with": "none"},
                     sample={"prompts": PROMPTS, "sampler": "euler_a", "every_n_steps": 2, "at_first": True})
    (job / "spec.json").write_bytes(encode_spec(spec))
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no",
               str(WORKER), str(job / "spec.json"), str(probe)]
    # Both ranks share one work folder, as in a pod (manifests.py sets LATHE_WORK_DIR per pod).
    # HF_HOME: no accelerate config file of this machine's user applies.
    env = {**os.environ, "LATHE_WORK_DIR": str(root / "work"), "LATHE_CACHE_DIR": str(root / "cache"),
           "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"job": job, "probe": probe, "ranks": ranks, "seconds": seconds, "log": proc.stderr}


def test_two_processes_really_ran_in_one_process_group(ddp_run: dict[str, Any]) -> None:
    for r, rec in enumerate(ddp_run["ranks"]):
        assert (rec["process_index"], rec["num_processes"], rec["backend"]) == (r, 2, "gloo"), rec
        assert rec["exit_code"] == 0 and rec["steps_done"] == 3 and len(rec["losses"]) == 3


def test_ranks_stay_identical_and_rank0_weights_are_published(ddp_run: dict[str, Any]) -> None:
    probe, job = ddp_run["probe"], ddp_run["job"]
    init0, init1 = load_file(str(probe / "init0.safetensors")), load_file(str(probe / "init1.safetensors"))
    final0, final1 = load_file(str(probe / "final0.safetensors")), load_file(str(probe / "final1.safetensors"))
    assert init0.keys() == final0.keys() == final1.keys() and len(final0) > 0
    # The job's seed fixes the initial adapter on every rank (DDP would also broadcast rank 0's).
    assert all(np.array_equal(init0[k], init1[k]) for k in init0)
    # Training happened: every trained tensor moved (alpha scalars are buffers, not trained).
    trained = [k for k in final0 if k.endswith(("lora_down.weight", "lora_up.weight"))]
    assert trained and all(not np.array_equal(final0[k], init0[k]) for k in trained)
    # ...and identically on both ranks, to the bit.
    diverged = [k for k in final0 if not np.array_equal(final0[k], final1[k])]
    assert not diverged, f"{len(diverged)} tensors differ between ranks, e.g. {diverged[:3]}"
    # The published adapter is rank 0's network.
    published = load_file(str(job / "output" / "tiny.safetensors"))
    assert published.keys() == final0.keys()
    assert all(published[k].dtype == final0[k].dtype and np.array_equal(published[k], final0[k]) for k in final0)


def test_only_rank0_writes_adapter_files(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert rank0["final_path"] and rank0["saved_files"] == [rank0["final_path"]]
    assert rank1["final_path"] is None and rank1["saved_files"] == []
    outputs = sorted(p.name for p in (ddp_run["job"] / "output").iterdir() if p.is_file())
    assert outputs == ["dataset-manifest.json", "metadata.json", "spec.json", "tiny.safetensors"]


def test_each_rank_trains_on_its_own_share_of_the_epoch(ddp_run: dict[str, Any]) -> None:
    seen = [[key for batch in rec["batches"] for key in batch] for rec in ddp_run["ranks"]]
    assert [len(s) for s in seen] == [3, 3]
    assert not set(seen[0]) & set(seen[1]), seen
    assert len(set(seen[0]) | set(seen[1])) == 6  # one epoch: every image once, over both ranks
    assert ddp_run["ranks"][0]["losses"] != ddp_run["ranks"][1]["losses"]  # each loss is of its own batch


def test_samples_are_split_between_ranks_and_all_published(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["ranks"]
    rounds = ["000000", "000002", "000003"]
    assert sorted(rank0["samples"]) == sorted(f"{r}/{i}.png" for r in rounds for i in (0, 2))
    assert sorted(rank1["samples"]) == [f"{r}/1.png" for r in rounds]
    out = ddp_run["job"] / "output"
    expected = sorted(f"samples/{r}/{i}.png" for r in rounds for i in range(len(PROMPTS)))
    assert sorted(str(p.relative_to(out)) for p in out.glob("samples/*/*.png")) == expected
    metadata = json.loads((out / "metadata.json").read_text())
    listed = {o["name"]: o for o in metadata["outputs"]}
    assert sorted(n for n in listed if n.startswith("samples/")) == expected, "rank 1's samples not listed"
    assert all(listed[n]["kind"] == "sample" and listed[n]["size"] == (out / n).stat().st_size for n in expected)
    for name in expected:
        step, index = int(name.split("/")[1]), int(name.split("/")[2][:-4])
        with Image.open(out / name) as image:
            image.load()
            text = dict(image.text)
        width = {0: 64, 1: 96, 2: 64}[index]
        height = {0: 64, 1: 64, 2: 96}[index]
        assert image.size == (width, height)
        assert PROMPTS[index].startswith(text["prompt"] + " --")
        params = text["parameters"]
        assert "Sampler: euler_a" in params and f"Training step: {step}" in params
        assert f"Size: {width}x{height}" in params and f"Steps: {2 if index == 2 else 1}" in params
    with Image.open(out / "samples/000002/0.png") as image:
        assert image.text["negative_prompt"] == "blurry"
        assert "Seed: 7" in image.text["parameters"] and "CFG scale: 5.0" in image.text["parameters"]
    print(f"2-process run: {ddp_run['seconds']:.1f} s")
