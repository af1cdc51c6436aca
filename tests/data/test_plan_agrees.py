"""The preflight's step prediction is what the trainer's dataset yields.

The service's preflight (`run_preflight` on a local folder, which reads image headers through a
LocalStore) and the trainer's `TrainDataset` (which opens the files) must agree on batches and steps
per epoch for any layout: mixed aspect ratios over several buckets, `N_name` repeats, regularisation
images balanced against the training images, batch sizes 1–3, gradient
accumulation, two processes, with and without bucketing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from data_helpers import list_files
from PIL import Image

from service.jobs.preflight import run_preflight
from trainer.core.dataset.layout import discover_layout
from trainer.core.spec import spec_from_obj
from trainer.data.dataset import TrainDataset

# (folder, sizes): aspect ratios from 1:2 to 2:1 so bucketing spreads them over several buckets.
TRAIN = {
    "3_cat": [(96, 96), (128, 64), (64, 128), (120, 80), (80, 120)],
    "1_dog": [(100, 100), (200, 100), (90, 150), (96, 96)],
    "2_bird": [(150, 90), (64, 64), (110, 70)],
}
REG = {"1_animal": [(96, 96), (128, 64), (64, 128), (100, 100), (140, 90), (70, 120), (96, 96)]}


def _write(root: Path, folders: dict[str, list[tuple[int, int]]]) -> Path:
    for folder, sizes in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (40 * i % 256, 90, 160)).save(root / folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plan")
    return {"train": _write(base / "train", TRAIN), "reg": _write(base / "reg", REG),
            "one": _write(base / "one", {"4_cat": TRAIN["3_cat"]})}


CASES = [
    # (train root, with reg, enable_bucket, batch size, gradient accumulation, gpus)
    *[("train", False, bucket, bs, 1, 0) for bucket in (True, False) for bs in (1, 2, 3)],
    *[("train", True, bucket, bs, 1, 0) for bucket in (True, False) for bs in (1, 2, 3)],
    ("train", True, True, 2, 3, 0),
    ("train", False, True, 3, 2, 2),
    ("train", True, False, 1, 2, 2),
    ("one", True, False, 2, 2, 2),
    ("one", True, True, 3, 1, 0),
    ("one", False, False, 2, 1, 0),
]


@pytest.mark.parametrize("root,with_reg,bucket,batch_size,accumulation,gpus", CASES)
def test_preflight_steps_equal_what_the_trainer_yields(roots, root, with_reg, bucket, batch_size, accumulation,
                                                       gpus):
    dataset = {"uri": str(roots[root]), "resolution": 96, "enable_bucket": bucket, "min_bucket_reso": 64,
               "max_bucket_reso": 128, "bucket_reso_steps": 16}
    if with_reg:
        dataset["reg_uri"] = str(roots["reg"])
    spec = spec_from_obj({"version": 1, "model": {"uri": "model"}, "dataset": dataset,
                          "training": {"batch_size": batch_size, "gradient_accumulation_steps": accumulation},
                          "resources": {"gpus": gpus}})
    report = run_preflight(spec)
    assert report.problems == []

    reg_root = roots["reg"] if with_reg else None
    layout = discover_layout(spec, list_files(roots[root]), list_files(reg_root) if reg_root else None)
    trained = TrainDataset(layout, spec, str(roots[root]), reg_root=str(reg_root) if reg_root else None, workers=1)
    world = max(1, gpus)
    for epoch in (1, 2):
        batches = [trained.epoch_batches(epoch, seed=5, batch_size=batch_size, rank=r, world_size=world)
                   for r in range(world)]
        assert report.batches_per_epoch == len(trained.epoch_batches(epoch, seed=5, batch_size=batch_size))
        assert {len(b) for b in batches} == {math.ceil(report.batches_per_epoch / world)}
        assert report.steps_per_epoch == math.ceil(len(batches[0]) / accumulation)
    assert report.steps_per_epoch == trained.steps_per_epoch(batch_size, world, accumulation)
    assert report.image_steps_per_epoch == sum(len(b.slots) for b in trained.buckets)
    by_reso: dict[tuple[int, int], int] = {}
    for b in trained.buckets:
        by_reso[b.reso] = by_reso.get(b.reso, 0) + len(b.slots)
    assert {(b.width, b.height): b.image_steps for b in report.buckets} == by_reso
    if bucket:
        assert len(report.buckets) > 1
    if with_reg:
        assert any(it.is_reg for it in trained.items)
