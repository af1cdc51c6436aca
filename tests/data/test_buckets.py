"""Aspect-ratio buckets against values computed by hand from sd-scripts' rules."""

from __future__ import annotations

import pytest

from trainer.core.dataset.buckets import BucketParams, crop_ltrb, make_buckets, plan_buckets, round_to_steps, select_bucket

from data_helpers import TINY_BUCKETS, make_spec

SD15_BUCKETS = [  # resolution 512, min 256, max 1024, steps 64: widths 256..1024 with the tallest fitting height
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_make_buckets_sd15_defaults():
    assert make_buckets(512, 256, 1024, 64) == SD15_BUCKETS


def test_make_buckets_tiny_scale():
    # area 4096: width 48 → 4096 // 48 = 85 → 80; width 80 → 51 → 48; width ≥ 96 → 32
    assert make_buckets((64, 64), 32, 128, 16) == [
        (32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]


def test_make_buckets_non_square_resolution_keeps_area():
    buckets = make_buckets((768, 512), 256, 1024, 64)
    assert (576, 640) in buckets  # 768*512 // 576 = 682 → 640
    assert all(w * h <= 768 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_round_to_steps():
    assert round_to_steps(724.08, 64) == 704
    assert round_to_steps(63.5, 64) == 64
    assert round_to_steps(63.4, 64) == 0


@pytest.mark.parametrize(("size", "bucket", "resized"), [
    ((1000, 600), (640, 384), (640, 384)),  # aspect 5:3 is a bucket's aspect exactly
    ((1200, 800), (640, 384), (640, 427)),  # 1.5: closest is 640x384 (error 0.167 < 0.214); cover by width
    ((600, 1000), (384, 640), (384, 640)),
    ((448, 576), (448, 576), (448, 576)),  # an image of a bucket's exact size keeps it
    ((300, 300), (512, 512), (512, 512)),  # upscaled
    ((3000, 1000), (832, 256), (832, 277)),  # aspect 3: 832/256 = 3.25 beats 896/256 = 3.5; cover by width
])
def test_select_bucket_predefined(size, bucket, resized):
    assert select_bucket(*size, buckets=SD15_BUCKETS) == (bucket, resized)


@pytest.mark.parametrize(("size", "bucket", "resized"), [
    ((300, 200), (256, 192), (300, 200)),  # small enough: no resize, sides cut to steps
    ((2000, 1000), (640, 320), (640, 320)),  # shrunk to area ≤ 512²: height rounding keeps aspect 2 exactly
    ((1000, 1000), (512, 512), (512, 512)),
    ((40, 100), (0, 64), (40, 100)),  # smaller than one step: unusable (0 side)
])
def test_select_bucket_no_upscale(size, bucket, resized):
    assert select_bucket(*size, buckets=None, max_area=512 * 512, steps=64, no_upscale=True) == (bucket, resized)


def test_crop_ltrb_uses_sd_scripts_fit_inside_rule():
    # bucket 64x64, image 80x48: height 64/ (5/3) = 38.4 → top (64 - 38.4) // 2 = 12
    assert crop_ltrb((64, 64), (80, 48)) == (0.0, 12.0, 64.0, 50.4)
    assert crop_ltrb((640, 384), (1000, 600)) == (0.0, 0.0, 640.0, 384.0)


def test_plan_buckets_tiny_dataset_counts():
    # The tiny dataset's 12 images (sizes cycle over 5, repeats 2/1/1 over 3 concepts) at 96 px, 16 px steps:
    # buckets (64,128) (80,112) (96,96) (112,80) (128,64); 80x48 (5:3) → 112x80 (1.4, error 0.27) rather than
    # 128x64 (2.0, error 0.33), but 48x80 (0.6) → 64x128 (0.5, error 0.1) rather than 80x112 (0.71, error 0.11).
    sizes = [(64, 64), (80, 48), (48, 80), (72, 56), (56, 72)] * 2 + [(64, 64), (80, 48)]
    repeats = [(2, 1, 1)[i % 3] for i in range(12)]
    plan = plan_buckets(sizes, make_spec(**TINY_BUCKETS), 2, repeats)
    assert [(b.reso, b.images, b.image_steps, b.batches) for b in plan.buckets] == [
        ((64, 128), 2, 2, 1), ((80, 112), 2, 3, 2), ((96, 96), 3, 4, 2), ((112, 80), 5, 7, 4)]
    assert plan.batches_per_epoch == 9 and plan.image_steps_per_epoch == 16
    assert plan.assignments[1] == ((112, 80), (133, 80))  # wider than the bucket: match heights, crop width
    assert plan.assignments[3] == ((112, 80), (112, 87))  # 72x56 is narrower than 1.4: match widths
    info = plan.bucket_info()
    assert plan.assignments[2] == ((64, 128), (77, 128))
    assert info is not None and info["buckets"][2] == {"resolution": [96, 96], "count": 4}
    assert plan_buckets(sizes, make_spec(**TINY_BUCKETS), 4, repeats).batches_per_epoch == 1 + 1 + 1 + 2


def test_plan_without_bucketing_uses_resolution_only():
    plan = plan_buckets([(80, 48), (48, 80), (64, 64)], BucketParams(resolution=(64, 64)), 1)
    assert [b.reso for b in plan.buckets] == [(64, 64)]
    assert plan.assignments[0] == ((64, 64), (107, 64)) and plan.bucket_info() is None


def test_plan_reports_unusable_images():
    plan = plan_buckets([(40, 40), (100, 100)], BucketParams((64, 64), True, 32, 128, 64, True), 1)
    assert plan.unusable == [0] and [b.reso for b in plan.buckets] == [(64, 64)]
