"""Bad datasets the preflight can see, through the HTTP API: empty folders, no images, only captions,
corrupt and truncated PNG/JPEG/WebP headers, decompression bombs, hostile zip/tar archives (path
traversal, links, special files, damaged members) and names that climb out of the dataset. Each must be
a 422 whose problems name the dataset field and the file or member at fault, with nothing stored changed.

What only the trainer can see (pixel data cut short after an intact header, captions, compressed
tarballs, archive size limits, model files) is in test_badinput_trainer.py."""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable

import pytest

from tests.badinput.badinput_helpers import (
    auth, check_problem, good_members, image, png_header, problem_paths, spec, tar_bytes, tar_special, zip_bytes,
    zip_empty_name, zip_member_before_start, zip_patched, zip_symlink,
)

PNG, JPEG, WEBP = image(), image(fmt="JPEG"), image(fmt="WEBP")


def _flip(data: bytes, start: int, count: int) -> bytes:
    out = bytearray(data)
    for i in range(start, min(start + count, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


def _deflated_zip_with_corrupt_data() -> bytes:
    data = zip_bytes([("1_cat/a.png", PNG * 4)], compression=zipfile.ZIP_DEFLATED)
    return _flip(data, 30 + len("1_cat/a.png"), 40)  # inside the first member's compressed bytes


def _zip_with_flag(flag_offset_local: int, flag_offset_central: int, value: int) -> bytes:
    import struct

    data = bytearray(zip_bytes([("1_cat/a.png", PNG)], compression=zipfile.ZIP_DEFLATED))
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, flag_offset_local, value)
    struct.pack_into("<H", data, central + flag_offset_central, value)
    return bytes(data)


# (id, objects under the dataset prefix {relative key: bytes} — or one archive {"<name>.zip|.tar": bytes},
#  the problem path that must be named, words the message must hold)
Files = dict[str, bytes]
DATASET_CASES: list[tuple[str, Callable[[], Files], str, str]] = [
    ("empty-prefix", lambda: {}, "dataset.uri", "nothing found"),
    ("no-images", lambda: {"1_cat/a.bin": b"\0" * 10, "1_cat/meta.json": b"{}"}, "dataset.uri", "no training images"),
    ("only-captions", lambda: {"1_cat/a.txt": b"a cat", "1_cat/b.txt": b"a cat"}, "dataset.uri",
     "no training images"),
    ("flat-folder", lambda: {"a.png": PNG, "a.txt": b"a cat"}, "dataset.uri", "<repeats>_<concept>"),
    ("zero-byte-png", lambda: {"1_cat/a.png": b""}, "dataset.uri:1_cat/a.png", "not a readable image"),
    ("text-named-png", lambda: {"1_cat/a.png": b"just some text, not pixels"}, "dataset.uri:1_cat/a.png",
     "not a PNG, JPEG, WebP or BMP"),
    ("corrupt-png-signature", lambda: {"1_cat/a.png": b"\x89PNX" + PNG[4:]}, "dataset.uri:1_cat/a.png",
     "not a readable image"),
    ("corrupt-png-ihdr", lambda: {"1_cat/a.png": _flip(PNG, 12, 4)}, "dataset.uri:1_cat/a.png",
     "not a readable image"),
    ("truncated-png-header", lambda: {"1_cat/a.png": PNG[:20]}, "dataset.uri:1_cat/a.png", "not a readable image"),
    ("corrupt-jpeg", lambda: {"1_cat/a.jpg": b"\xff\xd8\xff" + bytes(range(256)) * 2}, "dataset.uri:1_cat/a.jpg",
     "not a readable image"),
    ("truncated-jpeg-header", lambda: {"1_cat/a.jpg": JPEG[:100]}, "dataset.uri:1_cat/a.jpg", "not a readable image"),
    ("corrupt-webp", lambda: {"1_cat/a.webp": b"RIFF\x00\x10\x00\x00WEBPVP8 " + bytes(300)},
     "dataset.uri:1_cat/a.webp", "not a readable image"),
    ("truncated-webp", lambda: {"1_cat/a.webp": WEBP[:24]}, "dataset.uri:1_cat/a.webp", "not a readable image"),
    ("zero-width-png", lambda: {"1_cat/a.png": png_header(0, 64)}, "dataset.uri:1_cat/a.png", "not a readable image"),
    ("decompression-bomb", lambda: {"1_cat/a.png": png_header(30_000, 30_000)}, "dataset.uri:1_cat/a.png",
     "decompression bomb"),
    ("over-pixel-limit", lambda: {"1_cat/a.png": png_header(9000, 9000)}, "dataset.uri:1_cat/a.png",
     "over the limit"),
    ("one-bad-among-good", lambda: {"1_cat/a.png": PNG, "1_cat/a.txt": b"ok", "1_cat/b.jpg": JPEG[:50]},
     "dataset.uri:1_cat/b.jpg", "not a readable image"),
    ("key-climbs-out", lambda: {"1_cat/a.png": PNG, "1_cat/../../../state/x.png": PNG}, "dataset.uri",
     "climb out"),
    # archives, read through ranged GETs
    ("zip-dotdot", lambda: {"ds.zip": zip_bytes([*good_members(), ("../../escape.png", PNG)])}, "dataset.uri",
     "../../escape.png"),
    ("zip-absolute", lambda: {"ds.zip": zip_bytes([*good_members(), ("/etc/cron.d/x.png", PNG)])}, "dataset.uri",
     "/etc/cron.d/x.png"),
    ("zip-backslash-dotdot", lambda: {"ds.zip": zip_bytes([*good_members(), ("..\\..\\x.png", PNG)])},
     "dataset.uri", "outside its root"),
    ("zip-drive-letter", lambda: {"ds.zip": zip_bytes([*good_members(), ("C:\\x.png", PNG)])}, "dataset.uri",
     "outside its root"),
    ("zip-symlink-image", lambda: {"ds.zip": zip_bytes([*good_members(), zip_symlink("1_cat/b.png", "/etc/shadow")])},
     "dataset.uri", "1_cat/b.png"),
    ("zip-symlink-caption", lambda: {"ds.zip": zip_bytes([*good_members(),
                                                          zip_symlink("1_cat/b.txt", "/proc/self/environ")])},
     "dataset.uri", "links or special files"),
    ("zip-garbage", lambda: {"ds.zip": bytes(range(256)) * 8}, "dataset.uri", "not a readable archive"),
    ("zip-zero-bytes", lambda: {"ds.zip": b""}, "dataset.uri", "not a readable archive"),
    ("zip-truncated", lambda: {"ds.zip": zip_bytes(good_members())[:-30]}, "dataset.uri", "not a readable archive"),
    ("zip-empty", lambda: {"ds.zip": zip_bytes([])}, "dataset.uri", "no training images"),
    ("zip-only-captions", lambda: {"ds.zip": zip_bytes([("1_cat/a.txt", b"a cat")])}, "dataset.uri",
     "no training images"),
    ("zip-corrupt-member-data", lambda: {"ds.zip": _deflated_zip_with_corrupt_data()}, "dataset.uri:1_cat/a.png",
     "cannot be read from the archive"),
    ("zip-encrypted-member", lambda: {"ds.zip": _zip_with_flag(6, 8, 1)}, "dataset.uri:1_cat/a.png", "encrypted"),
    ("zip-unsupported-compression", lambda: {"ds.zip": _zip_with_flag(8, 10, 9)}, "dataset.uri:1_cat/a.png",
     "compression"),
    ("zip-name-not-utf8", lambda: {"ds.zip": zip_patched(name=b"1_cat/\xa9\xa9.png", utf8_flag=True)}, "dataset.uri",
     "not a readable archive"),
    ("zip-empty-member-name", lambda: {"ds.zip": zip_empty_name()}, "dataset.uri", "not a readable archive"),
    ("zip-version-unsupported", lambda: {"ds.zip": zip_patched(version_needed=64)}, "dataset.uri", "zip file version"),
    ("zip-member-before-start", lambda: {"ds.zip": zip_member_before_start()}, "dataset.uri:1_cat/a.png",
     "cannot be read from the archive"),
    ("tar-dotdot", lambda: {"ds.tar": tar_bytes([*good_members(), ("../../escape.png", PNG)])}, "dataset.uri",
     "../../escape.png"),
    ("tar-absolute", lambda: {"ds.tar": tar_bytes([*good_members(), ("/etc/x.png", PNG)])}, "dataset.uri",
     "/etc/x.png"),
    ("tar-symlink", lambda: {"ds.tar": tar_bytes([*good_members(), tar_special("1_cat/b.png", tarfile.SYMTYPE,
                                                                                "/etc/shadow")])},
     "dataset.uri", "1_cat/b.png"),
    ("tar-hardlink", lambda: {"ds.tar": tar_bytes([*good_members(), tar_special("1_cat/b.png", tarfile.LNKTYPE,
                                                                                 "1_cat/a.png")])},
     "dataset.uri", "links"),
    ("tar-fifo", lambda: {"ds.tar": tar_bytes([*good_members(), tar_special("1_cat/b.png", tarfile.FIFOTYPE)])},
     "dataset.uri", "1_cat/b.png"),
    ("tar-char-device", lambda: {"ds.tar": tar_bytes([*good_members(), tar_special("1_cat/zero", tarfile.CHRTYPE)])},
     "dataset.uri", "special files"),
    ("tar-garbage", lambda: {"ds.tar": bytes(range(256)) * 8}, "dataset.uri", "not a readable archive"),
    ("tar-truncated", lambda: {"ds.tar": tar_bytes(good_members())[:700]}, "dataset.uri", "not a readable archive"),
]


@pytest.mark.parametrize("case, files, field, words", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_bad_dataset_fails_the_preflight(bi_api, bi_s3, bi_bucket, bi_unchanged, case, files, field, words):
    prefix = f"datasets/bad/{case}"
    objects = files()
    for key, data in objects.items():
        bi_s3.put_object(Bucket=bi_bucket, Key=f"{prefix}/{key}", Body=data)
    archive = next((k for k in objects if k.endswith((".zip", ".tar"))), None)
    uri = f"s3://{bi_bucket}/{prefix}/{archive}" if archive else f"s3://{bi_bucket}/{prefix}"
    body = {"spec": spec(bi_bucket, **{"dataset.uri": uri})}
    # A submit (validate runs the same checks; test_badinput_specs sends both).
    problem = check_problem(bi_api.post("/v1/jobs", json=body, headers=auth()), 422, [words])
    assert problem["type"].endswith("/preflight-failed"), problem
    assert field in problem_paths(problem), (field, problem)
    assert problem["preflight"]["dataset_uri"] == uri


def test_bad_reg_dataset_names_its_own_field(bi_api, bi_s3, bi_bucket, bi_unchanged):
    bi_s3.put_object(Bucket=bi_bucket, Key="datasets/bad/reg/1_person/a.png", Body=PNG[:16])
    body = {"spec": spec(bi_bucket, **{"dataset.reg_uri": f"s3://{bi_bucket}/datasets/bad/reg"})}
    problem = check_problem(bi_api.post("/v1/jobs", json=body, headers=auth()), 422, ["not a readable image"])
    assert "dataset.reg_uri:1_person/a.png" in problem_paths(problem), problem


TOML_CASES = [
    ("not-toml", "[[datasets]\nresolution = 'big'", "not valid TOML"),
    ("unknown-key", "[[datasets]]\nbogus = 1\n[[datasets.subsets]]\nimage_dir = '2_cat'", "unknown key 'bogus'"),
    ("no-subsets", "[[datasets]]\nresolution = 64", "no [[datasets.subsets]]"),
    ("subset-dir-climbs-out", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '../../state'", "../../state"),
    # Wrong types where a number or a string belongs: these were 500s (found by fuzzing).
    ("bucket-reso-string", "[[datasets]]\nmin_bucket_reso = 'abc'\n[[datasets.subsets]]\nimage_dir = '2_cat'",
     "'min_bucket_reso' must be an integer"),
    ("bucket-steps-list", "[general]\nbucket_reso_steps = [1, 2]\n[[datasets]]\n[[datasets.subsets]]\n"
     "image_dir = '2_cat'", "'bucket_reso_steps' must be an integer"),
    ("caption-extension-int", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '2_cat'\ncaption_extension = 5",
     "'caption_extension' must be a string"),
    ("unsupported-option", "[[datasets]]\nalpha_mask = true\n[[datasets.subsets]]\nimage_dir = '2_cat'",
     "does not support"),
]


@pytest.mark.parametrize("case, text, words", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_config_toml_is_named(bi_api, bi_bucket, bi_unchanged, case, text, words):
    body = {"spec": spec(bi_bucket, **{"dataset.config_toml": text})}
    problem = check_problem(bi_api.post("/v1/jobs", json=body, headers=auth()), 422, [words])
    assert "dataset.config_toml" in problem_paths(problem), problem


def test_subset_dir_climbing_out_is_named(bi_api, bi_bucket, bi_unchanged):
    body = {"spec": spec(bi_bucket, **{"dataset.subsets": [{"image_dir": "../../state"}]})}
    problem = check_problem(bi_api.post("/v1/jobs", json=body, headers=auth()), 422, ["../../state"])
    assert "dataset.subsets[0].image_dir" in problem_paths(problem), problem
