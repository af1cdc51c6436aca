"""TrainDataset end to end on generated images: problems reported not raised, buckets, epochs, batches, tokens."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import TINY_BUCKETS, list_files, make_spec
from PIL import Image

from trainer.core.dataset.layout import discover_layout
from trainer.core.dataset.plan import plan_epoch
from trainer.data.dataset import ItemRef, TrainDataset, tokenize
from trainer.core.failures import JobFailure, Reason
from trainer.tools.tinydata import make_tiny_dataset


def build(root, reg_root=None, tokenizers=(), max_token_length=None, **dataset):
    spec = make_spec(**{**TINY_BUCKETS, **dataset})
    layout = discover_layout(spec, list_files(root), list_files(reg_root) if reg_root else None)
    return TrainDataset(layout, spec, str(root), tokenizers=list(tokenizers), max_token_length=max_token_length,
                        reg_root=str(reg_root) if reg_root else None)


@pytest.fixture(scope="module")
def tiny(tiny_root, tokenizers):
    return build(tiny_root, tokenizers=[tokenizers["eos"], tokenizers["bang"]], flip_aug=True)


def test_buckets_and_counts_match_the_plan(tiny):
    assert tiny.problems == [] and len(tiny.items) == 12
    assert [(b.reso, len(b.slots)) for b in tiny.buckets] == [
        ((64, 128), 2), ((80, 112), 3), ((96, 96), 4), ((112, 80), 7)]
    assert tiny.image_steps_per_epoch == 16
    assert tiny.num_batches(2) == 9 and tiny.steps_per_epoch(2) == 9
    assert tiny.steps_per_epoch(2, world_size=2, grad_accum=2) == 3  # ceil(9 / 2 / 2)
    assert tiny.steps_per_epoch(4) == 5


def test_epoch_batches_are_deterministic_single_bucket_and_complete(tiny):
    a = tiny.epoch_batches(1, seed=42, batch_size=2)
    assert a == tiny.epoch_batches(1, seed=42, batch_size=2)
    assert a != tiny.epoch_batches(2, seed=42, batch_size=2) and a != tiny.epoch_batches(1, seed=43, batch_size=2)
    assert len(a) == tiny.num_batches(2)
    for batch in a:
        assert len({tiny.items[r.item].bucket for r in batch}) == 1 and 1 <= len(batch) <= 2
    seen = Counter(r.item for batch in a for r in batch)
    assert seen == {i: it.repeats for i, it in enumerate(tiny.items)}
    with pytest.raises(ValueError, match="1-based"):
        tiny.epoch_batches(0, seed=42, batch_size=2)


def test_epoch_batches_shard_evenly_across_ranks(tiny):
    full = tiny.epoch_batches(3, seed=7, batch_size=2)
    ranks = [tiny.epoch_batches(3, seed=7, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [5, 5]  # 9 batches → ceil(9 / 2) each, the last one wraps around
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2] + [full[0]]
    four = [tiny.epoch_batches(3, seed=7, batch_size=2, rank=r, world_size=4) for r in range(4)]
    assert {len(r) for r in four} == {3}
    dealt = [tuple(b) for r in four for b in r]
    assert set(dealt) == {tuple(b) for b in full} and len(dealt) == 12  # 9 batches + 3 wrapped around


def test_load_batch_tensors_and_conditioning(tiny):
    batch_refs = next(b for b in tiny.epoch_batches(1, seed=1, batch_size=2) if len(b) == 2)
    out = tiny.load_batch(batch_refs, epoch=1, rng=random.Random(0))
    w, h = out.bucket
    assert out.pixel_values.shape == (2, 3, h, w) and out.pixel_values.dtype == torch.float32
    assert out.pixel_values.min() >= -1 and out.pixel_values.max() <= 1 and out.pixel_values.std() > 0.1
    assert [t.shape for t in out.input_ids] == [(2, 77), (2, 77)] and out.input_ids[0].dtype == torch.long
    assert out.loss_weights.tolist() == [1.0, 1.0]
    assert out.target_sizes_hw.tolist() == [[h, w], [h, w]]
    items = [tiny.items[r.item] for r in batch_refs]
    assert out.original_sizes_hw.tolist() == [[it.size[1], it.size[0]] for it in items]
    assert out.image_keys == [it.key for it in items] and out.image_keys[0].startswith("train:")
    assert out.captions == [it.caption for it in items]
    again = tiny.load_batch(batch_refs, epoch=1, rng=random.Random(0))
    assert torch.equal(out.pixel_values, again.pixel_values) and out.flipped == again.flipped
    light = tiny.load_batch(batch_refs, epoch=1, rng=random.Random(0), with_pixels=False)
    assert light.pixel_values is None and light.flipped == out.flipped
    assert torch.equal(light.crop_top_lefts, out.crop_top_lefts)


def test_flip_mirrors_pixels_and_crop_left(tiny):
    idx = next(i for i, it in enumerate(tiny.items) if it.size == (72, 56))  # 72x56 → bucket 112x80
    plain, mirrored = tiny.load_for_cache(ItemRef(idx))
    assert mirrored is not None and torch.equal(mirrored, torch.flip(plain, [2]))
    flips = {}
    for seed in range(20):
        out = tiny.load_batch([ItemRef(idx)], epoch=1, rng=random.Random(seed))
        flips[out.flipped[0]] = out
    assert set(flips) == {True, False}
    assert torch.equal(flips[False].pixel_values[0], plain) and torch.equal(flips[True].pixel_values[0], mirrored)
    # crop_ltrb of 72x56 in 112x80: bucket wider (1.4 > 1.29) → width 80 * 1.2857 = 102.86, left 4
    assert flips[False].crop_top_lefts.tolist() == [[0, 4]]
    assert flips[True].crop_top_lefts.tolist() == [[0, int(112 - (4 + 80 * 72 / 56))]]


def test_no_bucket_mode_resizes_to_cover_and_centre_crops(tiny_root):
    ds = build(tiny_root, resolution=64, enable_bucket=False)
    assert [b.reso for b in ds.buckets] == [(64, 64)]
    idx = next(i for i, it in enumerate(ds.items) if it.size == (80, 48))
    assert ds.items[idx].resized == (107, 64)
    pixels, flipped = ds.load_for_cache(idx)
    with Image.open(ds.items[idx].path) as img:
        expected = np.asarray(img.convert("RGB").resize((107, 64), Image.Resampling.LANCZOS))[:, 21:85]
    assert flipped is None
    assert torch.allclose(pixels, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)


def test_bad_files_are_reported_and_skipped(tmp_path, tiny_root):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    (root / "2_circle" / "garbage.png").write_bytes(b"this is not an image")
    (root / "2_circle" / "empty.jpg").write_bytes(b"")
    good = (root / "2_circle" / "circle_0000.png").read_bytes()
    (root / "2_circle" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "1_square" / "latin1.png")
    (root / "1_square" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    Image.new("RGB", (10, 10)).save(root / "1_square" / "speck.png")
    (root / "1_square" / "square_0000.txt").write_text("\n")
    ds = build(root, bucket_no_upscale=True)
    reasons = {p.path: p.reason for p in ds.problems}
    assert set(reasons) == {"2_circle/garbage.png", "2_circle/empty.jpg", "2_circle/truncated.png",
                            "1_square/latin1.txt", "1_square/speck.png"}
    assert "not a readable image" in reasons["2_circle/garbage.png"]
    assert "cannot be decoded" in reasons["2_circle/truncated.png"]
    assert "UTF-8" in reasons["1_square/latin1.txt"] and "bucket_reso_steps (16)" in reasons["1_square/speck.png"]
    assert len(ds.items) == 12 and str(ds.problems[0]).startswith(ds.problems[0].path + ": ")
    assert ds.warnings == ["1 caption file(s) are empty (e.g. '1_square/square_0000.txt'); their images train with "
                           "the subset's class tokens instead"]
    assert next(it.caption for it in ds.items if it.rel_path == "1_square/square_0000.png") == "square"
    # bucket_no_upscale: every image keeps its size, cut down to 16 px steps (72x56 → 64x48)
    assert {it.size: it.bucket for it in ds.items}[(72, 56)] == (64, 48)


def test_nothing_readable_is_dataset_invalid(tmp_path):
    (tmp_path / "3_x").mkdir()
    (tmp_path / "3_x" / "a.png").write_bytes(b"junk")
    with pytest.raises(JobFailure) as exc:
        build(tmp_path)
    assert exc.value.reason is Reason.DATASET_INVALID and "3_x/a.png" in exc.value.message


def test_reg_images_weigh_prior_loss_weight(tmp_path, tiny_root):
    reg = make_tiny_dataset(tmp_path / "reg", images=3, concepts=(("person", 1),)).root
    ds = build(tiny_root, reg_root=reg, prior_loss_weight=0.25)
    regs = [it for it in ds.items if it.is_reg]
    assert len(regs) == 3 and [it.repeats for it in regs] == [6, 5, 5]  # balanced to the 16 training image-steps
    assert all(it.key.startswith("reg:1_person/") for it in regs)
    refs = [ItemRef(ds.items.index(regs[0]))]
    assert ds.load_batch(refs, epoch=1, rng=random.Random(0)).loss_weights.tolist() == [0.25]
    assert ds.num_batches(1) == 32 and ds.image_steps_per_epoch == 16
    meta = ds.sd_scripts_metadata(1)
    assert meta["ss_num_train_images"] == 16 and meta["ss_num_reg_images"] == 3
    assert meta["ss_dataset_dirs"]["1_person"] == {"n_repeats": 1, "img_count": 3}
    assert meta["ss_tag_frequency"]["2_circle"]["circle"] == 4 and meta["ss_num_batches_per_epoch"] == 32
    assert sum(b["count"] for b in meta["ss_bucket_info"]["buckets"].values()) == 32


def test_augmentations_are_reproducible_and_in_range(tiny_root):
    ds = build(tiny_root, color_aug=True, random_crop=True, shuffle_caption=True, keep_tokens=1)
    refs = [ItemRef(i) for i, it in enumerate(ds.items) if it.bucket == (112, 80)][:3]
    outs = [ds.load_batch(refs, epoch=2, rng=random.Random(s)) for s in (5, 5, 6)]
    assert torch.equal(outs[0].pixel_values, outs[1].pixel_values) and outs[0].captions == outs[1].captions
    variants = {ds.load_batch(refs, epoch=2, rng=random.Random(s)).pixel_values.sum().item() for s in range(12)}
    assert len(variants) > 3
    assert all(-1 <= o.pixel_values.min() and o.pixel_values.max() <= 1 for o in outs)
    for caption, ref in zip(outs[2].captions, refs):
        raw = ds.items[ref.item].caption
        assert caption.split(", ")[0] == raw.split(", ")[0] and sorted(caption.split(", ")) == sorted(raw.split(", "))


def test_token_windows_follow_sd_scripts(tokenizers):
    eos_tok, bang_tok = tokenizers["eos"], tokenizers["bang"]
    bos, eos = eos_tok.bos_token_id, eos_tok.eos_token_id
    long_caption = "abcdefghij " * 15  # 150 letters: one byte-level token each
    ids = tokenize(eos_tok, [long_caption, "ab"], 150)
    assert ids.shape == (2, 154)
    first, second = ids[0, :77], ids[0, 77:]
    assert first[0] == bos and first[-1] == eos and second[0] == bos and second[-1] == eos
    plain = eos_tok(long_caption, truncation=True, max_length=152, padding="max_length").input_ids
    assert first[1:76].tolist() == plain[1:76] and second[1:76].tolist() == plain[76:151]
    assert tokenize(eos_tok, ["ab"], 225).shape == (1, 231) and tokenize(eos_tok, ["ab"], None).shape == (1, 77)
    assert torch.equal(tokenize(eos_tok, ["ab"], 75), tokenize(eos_tok, ["ab"], None))

    # SD2 / SDXL's second encoder pad with "!": each window must still read BOS … EOS pad …
    pad = bang_tok.pad_token_id
    assert pad != eos
    short = tokenize(bang_tok, ["ab"], 150)[0]
    ab = bang_tok("ab").input_ids  # BOS a b</w> EOS
    assert short[:4].tolist() == ab and short[76] == pad
    assert short[77:80].tolist() == [bos, eos, pad]  # an all-padding window starts BOS EOS
    mid = tokenize(bang_tok, ["x" * 100], 150)[0]
    assert mid[76] == eos  # the text goes on past the first window: it still closes with EOS
    assert mid[77 + 25] != pad and mid[77 + 26] == eos and mid[77 + 27] == pad  # 100 tokens: 75 + 25, then EOS
    full = tokenize(bang_tok, [long_caption], 150)[0]
    assert full[76] == eos and full[-1] == eos  # text runs through both windows: each ends with EOS


def test_plan_from_header_sizes_predicts_the_trainer_counts(tmp_path, tiny_root):
    reg = make_tiny_dataset(tmp_path / "reg", images=5, concepts=(("person", 1),)).root
    toml = TOML_TWO_DATASETS
    for kwargs, reg_root in (({}, reg), ({"config_toml": toml}, None), ({"bucket_no_upscale": True}, None)):
        ds = build(tiny_root, reg_root=reg_root, **kwargs)
        sizes = []
        for sub in ds.layout.subsets:
            base = reg if sub.root == "reg" else tiny_root
            sizes.append([])
            for im in sub.images:
                with Image.open(base / im.path) as img:
                    sizes[-1].append(img.size)
        plan = plan_epoch(ds.layout.subsets, ds.datasets, sizes)
        assert plan.batches_per_epoch(3) == ds.num_batches(3) and plan.unusable == []
        assert plan.steps_per_epoch(3, 2, 2) == ds.steps_per_epoch(3, 2, 2)
    sizes[0][0] = None  # an unreadable image is left out, as the trainer leaves it out
    fewer = plan_epoch(ds.layout.subsets, ds.datasets, sizes)
    assert len(fewer.images) == len(plan.images) - 1
    assert (0, 0) not in {(im.subset, im.index) for im in fewer.images}
    with pytest.raises(ValueError, match="one entry per image"):
        plan_epoch(ds.layout.subsets, ds.datasets, sizes[1:])


TOML_TWO_DATASETS = """
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 96
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 16
batch_size = 2
  [[datasets.subsets]]
  image_dir = "2_circle"
  [[datasets.subsets]]
  image_dir = "1_square"
  is_reg = true
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "1_triangle"
  num_repeats = 3
"""


def test_toml_datasets_keep_their_own_geometry_and_batch_size(tiny_root):
    ds = build(tiny_root, config_toml=TOML_TWO_DATASETS, prior_loss_weight=0.5)
    by_dataset = {}
    for batch in ds.epoch_batches(1, seed=0, batch_size=3):
        items = [ds.items[r.item] for r in batch]
        dataset = ds.subsets[items[0].subset].dataset
        assert {ds.subsets[it.subset].dataset for it in items} == {dataset}
        by_dataset.setdefault(dataset, []).append(len(batch))
    assert max(by_dataset[0]) == 2 and max(by_dataset[1]) == 3  # [[datasets]] #1 sets batch_size = 2
    assert {b.reso for b in ds.buckets if b.dataset == 1} == {(64, 64)}  # no bucketing in the second dataset
    triangle = [it for it in ds.items if it.rel_path.startswith("1_triangle/")]
    assert all(it.key.endswith("@1") and it.repeats == 3 for it in triangle)
    squares = [it for it in ds.items if it.is_reg]
    assert [it.repeats for it in squares] == [1, 1, 1, 1] and {it.loss_weight for it in squares} == {0.5}
