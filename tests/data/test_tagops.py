"""Tag operations as pure functions, and the report's pure parts (dHash, duplicate groups, guidance)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from trainer.core.dataset.phash import dhash, distance, near_duplicate_groups
from trainer.core.dataset.report import size_guidance
from trainer.core.dataset.tagops import TagOp, apply_ops, frequencies, orphan_captions

CAPS = {"a.txt": "hero, Red_Hair, sword, hero", "b.txt": "hero, smile\nhero, sword", "c.txt": "rare, hero"}


def test_each_operation():
    assert apply_ops(CAPS, [TagOp("dedupe")])["a.txt"] == "hero, Red_Hair, sword"
    assert apply_ops(CAPS, [TagOp("remove", ("SWORD",))])["b.txt"] == "hero, smile\nhero"
    assert apply_ops(CAPS, [TagOp("replace", ("red_hair",), new="red hair")])["a.txt"] == "hero, red hair, sword"
    assert apply_ops(CAPS, [TagOp("add", ("x", "hero"), first=True)])["c.txt"] == "x, rare, hero"
    assert apply_ops(CAPS, [TagOp("trigger", ("hrx",))])["a.txt"] == "hrx, hero, Red_Hair, sword, hero"
    assert apply_ops(CAPS, [TagOp("trigger", ("sword",))])["a.txt"] == "sword, hero, Red_Hair, hero"


def test_min_count_counts_captions_not_occurrences():
    assert frequencies(CAPS) == {"hero": 3, "red_hair": 1, "sword": 2, "smile": 1, "rare": 1}
    out = apply_ops(CAPS, [TagOp("min_count", min_count=2)])
    assert out == {"a.txt": "hero, sword, hero", "b.txt": "hero\nhero, sword", "c.txt": "hero"}


def test_orphan_captions():
    files = ["1_a/x.png", "1_a/x.txt", "1_a/y.txt", "1_a/z.JPG", "1_a/z.txt", "top.txt"]
    assert orphan_captions(files, ".txt", (".png", ".jpg")) == ["1_a/y.txt", "top.txt"]


def _encoded(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    small = (np.random.default_rng(seed).random((4, 6, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(buf, fmt)
    return buf.getvalue()


def test_dhash_matches_re_encoded_copies_and_separates_others():
    base = dhash(_encoded(1, (120, 80), "PNG"))
    assert distance(base, dhash(_encoded(1, (300, 200), "JPEG"))) <= 6
    others = [distance(base, dhash(_encoded(s, (120, 80), "PNG"))) for s in range(2, 8)]
    assert min(others) > 6, others
    assert near_duplicate_groups({"a": 0, "b": 0b111, "c": 2**64 - 1, "d": 2**64 - 2}) == [["a", "b"], ["c", "d"]]


def test_size_guidance_names_only_what_is_outside_the_ranges():
    assert size_guidance(80, 400, 5000, "character") == []
    assert size_guidance(80, 400, 5000, "style") == [
        "5000 image-steps in total (images × repeats × epochs): fewer than the guides suggest (8000–12000 for a "
        "style); a rough figure, not a rule"]
    assert size_guidance(120, 400, None, None) == []  # inside the style range
    assert "more than" in size_guidance(400, 400, None, None)[0]


def test_report_reads_captions_as_the_trainer_does():
    from trainer.core.dataset.report import build_report
    from trainer.core.spec import DatasetSpec

    files = ["2_cat/a.png", "2_cat/a.txt", "2_cat/b.png", "2_cat/b.txt", "2_cat/c.png"]
    ds = DatasetSpec(uri="s3://b/d", caption_extension=".txt")
    sizes = {f: (64, 64) for f in files if f.endswith(".png")}
    r = build_report(ds, files, sizes, captions={"2_cat/a.txt": " Tabby, cat \nsecond line", "2_cat/b.txt": "\n"})
    assert r.tag_frequency == {"2_cat": {"tabby": 1, "cat": 3}}  # b (empty) and c (none) count "cat"
    assert r.without_caption == ["2_cat/b.png", "2_cat/c.png"] and r.concepts[0].without_caption == 2
    assert r.image_steps_per_epoch == 6 and r.buckets[0].images == 3
