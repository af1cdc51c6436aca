"""Dataset discovery over file listings: folder mode, explicit subsets, sd-scripts TOML, reg images."""

from __future__ import annotations

import subprocess
import sys

import pytest
from data_helpers import list_files, make_spec, make_unchecked_spec

from trainer.core.dataset.layout import balanced_repeats, discover_layout
from trainer.core.failures import JobFailure, Reason

TINY_SPEC = dict(caption_extension=".txt")


def test_folder_mode_on_the_tiny_dataset(tiny_root):
    layout = discover_layout(make_spec(**TINY_SPEC), list_files(tiny_root))
    assert [(s.name, s.num_repeats, s.class_tokens, len(s.images)) for s in layout.subsets] == [
        ("1_square", 1, "square", 4), ("1_triangle", 1, "triangle", 4), ("2_circle", 2, "circle", 4)]
    assert layout.image_steps_per_epoch == 16 and layout.num_reg_images == 0
    missing = [im.path for s in layout.subsets for im in s.images if im.caption_path is None]
    assert missing == ["1_square/square_0001.png", "2_circle/circle_0003.png"]
    assert layout.subsets[0].images[0].caption_path == "1_square/square_0000.txt"
    assert layout.warnings == [] and layout.unpaired_captions == [] and layout.unsupported == []
    assert layout.dataset_dirs()["2_circle"] == {"n_repeats": 2, "img_count": 4}


def test_folder_mode_reports_what_it_skips():
    files = [
        "10_my char/a.PNG", "10_my char/a.txt", "10_my char/b.webp", "10_my char/orphan.txt",
        "10_my char/readme.md", "10_my char/b.npz", "10_my char/.DS_Store", "10_my char/",
        "10_my char/nested/c.png", "notes/x.png", "0_zero/z.png", "loose.jpg", "3_a_b/x_1_2_3_4.jpg", "3_a_b/x.txt",
    ]
    layout = discover_layout(make_spec(**TINY_SPEC), files)
    subs = {s.name: s for s in layout.subsets}
    assert set(subs) == {"10_my char", "3_a_b"}
    assert subs["10_my char"].class_tokens == "my char"  # everything after the first "_"
    assert [im.path for im in subs["10_my char"].images] == ["10_my char/a.PNG", "10_my char/b.webp"]
    assert subs["10_my char"].images[0].caption_path == "10_my char/a.txt"
    assert subs["3_a_b"].images[0].caption_path == "3_a_b/x.txt"  # sd-scripts' face-crop name fallback
    assert layout.unpaired_captions == ["10_my char/orphan.txt"]
    assert layout.unsupported == ["10_my char/readme.md"]
    text = "\n".join(layout.warnings)
    for expected in ("'notes'", "num_repeats is 0", "'10_my char/nested'", "top of the train dataset",
                     "orphan.txt", "readme.md"):
        assert expected in text
    assert layout.image_steps_per_epoch == 10 * 2 + 3


def test_caption_extension_without_dot_and_case():
    layout = discover_layout(make_spec(caption_extension="caption"), ["1_x/a.jpeg", "1_x/a.caption", "1_x/b.BMP"])
    assert [im.caption_path for im in layout.subsets[0].images] == ["1_x/a.caption", None]


@pytest.mark.parametrize(("files", "needle"), [
    ([], "expected '<repeats>_<concept>' folders"),
    (["photos/a.png", "photos/a.txt"], "none of its folders (photos)"),
    (["5_x/readme.md"], "none of its folders (5_x)"),
])
def test_no_training_images_is_dataset_invalid(files, needle):
    with pytest.raises(JobFailure) as exc:
        discover_layout(make_spec(uri="s3://bucket/ds/"), files)
    assert exc.value.reason is Reason.DATASET_INVALID and exc.value.exit_code == 11
    assert "s3://bucket/ds/" in exc.value.message and needle in exc.value.message


def test_explicit_subsets_inherit_the_dataset_options(tiny_root):
    spec = make_spec(caption_extension=".txt", shuffle_caption=True, keep_tokens=1, subsets=[
        {"image_dir": "2_circle", "num_repeats": 3, "flip_aug": True, "class_tokens": "round thing"},
        {"image_dir": "1_square", "keep_tokens": 2, "caption_separator": ";"},
        {"image_dir": "missing_dir"},
    ])
    layout = discover_layout(spec, list_files(tiny_root))
    circle, square = layout.subsets
    assert (circle.num_repeats, circle.flip_aug, circle.class_tokens) == (3, True, "round thing")
    assert circle.caption.shuffle and circle.caption.keep_tokens == 1
    assert (square.num_repeats, square.caption.keep_tokens, square.caption.separator) == (1, 2, ";")
    assert not square.flip_aug
    assert layout.image_steps_per_epoch == 4 * 3 + 4
    text = "\n".join(layout.warnings)
    assert "dataset.subsets[2]: folder 'missing_dir' not found" in text
    assert "dataset.subsets[1]: 1 image(s) in '1_square' have no '.txt' caption file" in text


def test_explicit_subset_outside_the_dataset_is_refused(tiny_root):
    with pytest.raises(JobFailure) as exc:
        discover_layout(make_unchecked_spec(subsets=[{"image_dir": "../other"}]), list_files(tiny_root))
    assert exc.value.reason is Reason.SPEC_INVALID and "dataset.subsets[0].image_dir" in exc.value.message


TOML = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [96, 64]
batch_size = 3
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 16
flip_aug = true

  [[datasets.subsets]]
  image_dir = "2_circle"
  num_repeats = 5
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "1_square"
  flip_aug = false
  class_tokens = "box"
  caption_dropout_rate = 0.1

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = "1_triangle"
  is_reg = true
  num_repeats = 2
"""


def test_sd_scripts_toml_precedence(tiny_root):
    layout = discover_layout(make_spec(config_toml=TOML, dataset_repeats=4, shuffle_caption=False),
                             list_files(tiny_root))
    circle, square, triangle = layout.subsets
    assert (circle.num_repeats, circle.caption.keep_tokens, circle.flip_aug) == (5, 2, True)
    assert circle.caption.shuffle  # from [general], over the spec's shuffle_caption = false
    # num_repeats falls back to dataset.dataset_repeats (sd-scripts' --dataset_repeats) when no table sets it
    assert (square.num_repeats, square.flip_aug, square.class_tokens) == (4, False, "box")
    assert square.caption.dropout_rate == 0.1
    assert (triangle.is_reg, triangle.num_repeats, triangle.dataset, triangle.caption.keep_tokens) == (True, 2, 1, 1)
    first, second = layout.datasets
    assert first.batch_size == 3 and first.buckets.resolution == (96, 64) and first.buckets.enable_bucket
    assert first.buckets.steps == 16 and second.batch_size is None and second.buckets.resolution == (64, 64)
    assert not second.buckets.enable_bucket
    assert layout.image_steps_per_epoch == 4 * 5 + 4 * 4 and layout.num_reg_images == 8


@pytest.mark.parametrize(("toml", "needle"), [
    ("[[datasets]]\nfoo = 1\n[[datasets.subsets]]\nimage_dir = 'x'\n",
     "[[datasets]] #1: unknown key 'foo'; allowed here: batch_size"),
    ("[general]\nis_reg = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n",
     "[general]: unknown key 'is_reg'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeats = 'ten'\n",
     "[[datasets]] #1 [[datasets.subsets]] #1: 'num_repeats' must be an integer, got 'ten'"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "image_dir is required"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/etc'\n", "must be a folder inside the dataset"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nface_crop_aug_range = [2.0, 4.0]\n",
     "'face_crop_aug_range' is an sd-scripts option Lathe does not support"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\ncaption_dropout_rate = 1.5\n", "between 0 and 1"),
    ("[[datasets]]\nresolution = 64\nenable_bucket = true\n[[datasets.subsets]]\nimage_dir = 'x'\n",
     "min_bucket_reso 256 is above the resolution"),
    ("[general]\n", "no [[datasets]] table"),
    ("[[datasets]\n", "not valid TOML"),
    ("[model]\nx = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "unknown top-level key 'model'"),
])
def test_bad_toml_names_the_key_and_table(toml, needle):
    with pytest.raises(JobFailure) as exc:
        discover_layout(make_unchecked_spec(config_toml=toml), ["x/a.png"])
    assert exc.value.reason is Reason.SPEC_INVALID
    assert exc.value.message.startswith("dataset.config_toml: ") and needle in exc.value.message


def test_toml_defaults_and_ignored_keys():
    toml = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '.'\ncache_info = true\ntoken_warmup_min = 1\n"
    layout = discover_layout(make_spec(config_toml=toml, caption_extension=".txt"), ["a.png", "a.txt", "b.png"])
    (sub,) = layout.subsets
    assert sub.image_dir == "" and sub.num_repeats == 1 and len(sub.images) == 2
    assert layout.datasets[0].buckets.resolution == (512, 512)


def test_toml_repeats_zero_from_dataset_repeats_is_explained():
    toml = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n"
    with pytest.raises(JobFailure) as exc:
        discover_layout(make_spec(config_toml=toml, dataset_repeats=0), ["x/a.png"])
    assert exc.value.reason is Reason.DATASET_INVALID
    layout = discover_layout(make_spec(config_toml=toml + "[[datasets.subsets]]\nimage_dir = 'y'\nnum_repeats = 1\n",
                                       dataset_repeats=0), ["x/a.png", "y/b.png"])
    assert any("num_repeats is 0 (from dataset.dataset_repeats)" in w for w in layout.warnings)


def test_reg_folders_and_sd_scripts_balancing(tiny_root):
    reg = [f"1_person/p{i}.png" for i in range(5)] + ["10_extra/e0.png", "10_extra/e1.png", "10_extra/e2.png"]
    layout = discover_layout(make_spec(**TINY_SPEC), list_files(tiny_root), reg)
    regs = [s for s in layout.subsets if s.is_reg]
    assert [(s.name, s.root, s.class_tokens) for s in regs] == [
        ("10_extra", "reg", "extra"), ("1_person", "reg", "person")]
    assert layout.image_steps_per_epoch == 16 and layout.num_reg_images == 35
    repeats = balanced_repeats(layout.subsets)
    # 16 training image-steps: the first reg image brings 10, the second 10 more → enough; the rest are unused.
    assert repeats[-2:] == [[10, 10, 0], [0, 0, 0, 0, 0]]
    only_person = [s for s in layout.subsets if s.name != "10_extra"]
    # one pass gives 5, then one more per image per pass: 5 → 10 → 15 → 16
    assert balanced_repeats(only_person)[-1] == [4, 3, 3, 3, 3]
    assert balanced_repeats(only_person)[:3] == [[1] * 4, [1] * 4, [2] * 4]


def test_reg_uri_is_ignored_with_toml():
    toml = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n"
    layout = discover_layout(make_spec(config_toml=toml), ["x/a.png"], ["1_reg/r.png"])
    assert not any(s.is_reg for s in layout.subsets)
    assert any("dataset.reg_uri is ignored" in w for w in layout.warnings)


def test_pure_modules_import_without_torch_pil_or_numpy():
    code = ("import sys, trainer.core.dataset.layout, trainer.core.dataset.buckets, trainer.core.dataset.captions; "
            "bad = [m for m in ('torch', 'PIL', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
