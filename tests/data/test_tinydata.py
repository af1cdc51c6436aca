"""The generated tiny dataset: layout, determinism, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from data_helpers import list_files, make_spec
from PIL import Image

from trainer.core.dataset.layout import discover_layout
from trainer.tools.tinydata import MIXED_SIZES, main, make_tiny_dataset


def test_layout_captions_and_sizes(tmp_path):
    ds = make_tiny_dataset(tmp_path, images=10, concepts=(("red dot", 3), ("box", 1)))
    assert sorted({p.split("/")[0] for p in ds.images}) == ["1_box", "3_red dot"]
    assert len(ds.captions) == 8  # every 5th image has no caption file: the concept-name fallback
    assert ds.captions["3_red dot/red_dot_0000.png"].startswith("red dot, ")
    sizes = [Image.open(tmp_path / p).size for p in ds.images]
    assert sizes == [MIXED_SIZES[i % len(MIXED_SIZES)] for i in range(10)]
    assert any(p.endswith(".jpg") for p in ds.images)
    layout = discover_layout(make_spec(caption_extension=".txt"), list_files(tmp_path))
    assert layout.image_steps_per_epoch == ds.image_steps_per_epoch == 5 * 3 + 5 * 1
    # captions differ between images of one concept (colour, background): something to learn
    assert len({c for p, c in ds.captions.items() if p.startswith("3_")}) >= 3


def test_same_arguments_same_bytes(tmp_path):
    a = make_tiny_dataset(tmp_path / "a", images=6, seed=3)
    make_tiny_dataset(tmp_path / "b", images=6, seed=3)
    make_tiny_dataset(tmp_path / "c", images=6, seed=4)
    files = list_files(tmp_path / "a")
    assert files == list_files(tmp_path / "b")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / p).read_bytes() != (tmp_path / "c" / p).read_bytes() for p in a.images)


def test_cli_fixed_size(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--images", "7", "--size", "40x24"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 7 and summary["captioned"] == 6
    images = [p for p in list_files(tmp_path / "out") if not p.endswith(".txt")]
    assert len(images) == 7 and {Image.open(tmp_path / "out" / p).size for p in images} == {(40, 24)}


def test_cli_through_the_trainer_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "tiny-dataset", str(tmp_path / "d"), "--size", "bad"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--size expects WxH" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "trainer", "tiny-dataset", str(tmp_path / "d"), "--images", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"] == 3 and (tmp_path / "d" / "2_circle").is_dir()
