"""Bad inputs only the trainer sees, through its own functions in-process (no trainer subprocess):
archives it extracts (path traversal, links, devices, bombs past the size limit, damaged streams),
datasets it downloads, pixel data and captions it decodes, and base-model files it loads (0 bytes,
corrupt, pickles with code, the wrong architecture). Each case names the failure reason the job would
end with (trainer/core/failures.py) and the words — the file or member — its message must hold."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.badinput.badinput_helpers import (
    LEAK_MARKERS, good_members, image, png_header, tar_bytes, tar_special, zip_bytes, zip_empty_name,
    zip_member_before_start, zip_patched, zip_symlink,
)

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
from trainer.core.failures import JobFailure, Reason

PNG = image()
MB = 1024 * 1024


def _zip_lying_about_sizes() -> bytes:
    """A deflated member of 5 MB whose headers claim 1 KB: the declared-size check passes it."""
    import struct

    data = bytearray(zip_bytes([("1_cat/a.txt", b"\0" * (5 * MB))], compression=zipfile.ZIP_DEFLATED))
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, 22, 1024)
    struct.pack_into("<I", data, central + 24, 1024)
    return bytes(data)


# --------------------------------------------------------------------------------------- archives
# (id, archive file name, bytes, limits (max_bytes, max_files) or None, words the message must hold)
ARCHIVE_CASES: list[tuple[str, str, Callable[[], bytes], tuple[int, int] | None, str]] = [
    ("zip-dotdot", "d.zip", lambda: zip_bytes([*good_members(), ("../../../tmp/evil.png", PNG)]), None,
     "'../../../tmp/evil.png' climbs out"),
    ("zip-absolute", "d.zip", lambda: zip_bytes([("/etc/cron.d/evil", b"* * * * * root sh")]), None,
     "'/etc/cron.d/evil' has an absolute path"),
    ("zip-drive", "d.zip", lambda: zip_bytes([("C:\\Windows\\evil.png", PNG)]), None, "absolute path"),
    ("zip-symlink", "d.zip", lambda: zip_bytes([*good_members(), zip_symlink("1_cat/b.png", "/etc/shadow")]), None,
     "'1_cat/b.png' is a symbolic link"),
    ("zip-duplicate-member", "d.zip", lambda: zip_bytes([("1_cat/a.png", PNG), ("1_cat/a.png", PNG)]), None,
     "'1_cat/a.png' appears twice"),
    ("zip-file-then-folder", "d.zip", lambda: zip_bytes([("1_cat/a", b"x"), ("1_cat/a/b.png", PNG)]), None,
     "'1_cat/a/b.png' clashes"),
    ("zip-bomb-declared", "d.zip", lambda: zip_bytes([("1_cat/a.txt", b"\0" * (5 * MB))], zipfile.ZIP_DEFLATED),
     (MB, 100), "refusing it as a possible archive bomb"),
    ("zip-bomb-lying-header", "d.zip", _zip_lying_about_sizes, (MB, 100), "'1_cat/a.txt'"),
    ("zip-too-many-files", "d.zip", lambda: zip_bytes([(f"1_cat/{i}.txt", b"x") for i in range(20)]), (MB, 10),
     "more than 10 files"),
    ("zip-garbage", "d.zip", lambda: bytes(range(256)) * 4, None, "neither a zip nor a tar"),
    ("zip-truncated", "d.zip", lambda: zip_bytes(good_members())[:100], None, "neither a zip nor a tar"),
    ("zip-name-not-utf8", "d.zip", lambda: zip_patched(name=b"1_cat/\xa9\xa9.png", utf8_flag=True), None,
     "damaged or unsupported"),
    ("zip-empty-member-name", "d.zip", zip_empty_name, None, "damaged or unsupported"),
    ("zip-version-unsupported", "d.zip", lambda: zip_patched(version_needed=64), None, "zip file version"),
    ("zip-member-before-start", "d.zip", zip_member_before_start, None, "a member lies outside the file"),
    ("tar-dotdot", "d.tar", lambda: tar_bytes([*good_members(), ("../../evil.png", PNG)]), None,
     "'../../evil.png' climbs out"),
    ("tar-absolute", "d.tar", lambda: tar_bytes([("/root/.ssh/authorized_keys", b"ssh-ed25519 AAAA")]), None,
     "absolute path"),
    ("tar-symlink", "d.tar", lambda: tar_bytes([tar_special("1_cat/b.png", tarfile.SYMTYPE, "/etc/shadow")]), None,
     "'1_cat/b.png' is a symbolic link (to '/etc/shadow')"),
    ("tar-symlink-then-write-through", "d.tar",
     lambda: tar_bytes([tar_special("1_cat", tarfile.SYMTYPE, "/tmp"), ("1_cat/a.png", PNG)]), None,
     "'1_cat' is a symbolic link"),
    ("tar-hardlink", "d.tar", lambda: tar_bytes([("1_cat/a.png", PNG), tar_special("1_cat/b.png", tarfile.LNKTYPE,
                                                                                  "/etc/passwd")]), None,
     "'1_cat/b.png' is a hard link"),
    ("tar-fifo", "d.tar", lambda: tar_bytes([tar_special("1_cat/p.png", tarfile.FIFOTYPE)]), None,
     "'1_cat/p.png' is a device, FIFO"),
    ("tar-block-device", "d.tar", lambda: tar_bytes([tar_special("1_cat/sda", tarfile.BLKTYPE)]), None,
     "'1_cat/sda' is a device"),
    ("tar-file-then-folder", "d.tar", lambda: tar_bytes([("1_cat/a", b"x"), ("1_cat/a/b.png", PNG)]), None,
     "'1_cat/a/b.png' clashes"),
    ("tgz-bomb", "d.tar.gz", lambda: tar_bytes([("1_cat/a.txt", b"\0" * (5 * MB))], mode="w:gz"), (MB, 100),
     "expands to more than"),
    ("tgz-dotdot", "d.tgz", lambda: tar_bytes([*good_members(), ("../x.png", PNG)], mode="w:gz"), None,
     "'../x.png' climbs out"),
    ("tgz-truncated", "d.tar.gz", lambda: tar_bytes([("1_cat/a.png", os.urandom(200_000))], mode="w:gz")[:5000],
     None, "damaged or unsupported"),
    ("tar-xz-too-many-files", "d.tar.xz", lambda: tar_bytes([(f"1_cat/{i}.txt", b"x") for i in range(20)],
                                                            mode="w:xz"), (MB, 10), "more than 10 files"),
]


@pytest.mark.parametrize("case, name, build, limits, words", ARCHIVE_CASES, ids=[c[0] for c in ARCHIVE_CASES])
def test_bad_archive_is_dataset_invalid(tmp_path, case, name, build, limits, words):
    from trainer.job.fetch import fetch_dataset

    archive = tmp_path / "in" / name
    archive.parent.mkdir()
    archive.write_bytes(build())
    dest = tmp_path / "work" / "dataset"
    dest.parent.mkdir()
    kwargs = {"max_bytes": limits[0], "max_files": limits[1]} if limits else {}
    with pytest.raises(JobFailure) as err:
        fetch_dataset(str(archive), str(dest), **kwargs)
    _check_failure(err.value, Reason.DATASET_INVALID, [words, name])
    # Nothing half-extracted stays behind, and nothing landed beside or above the target.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["in", f"in/{name}", "work"]


# ----------------------------------------------------------------------------- datasets on S3
# (id, objects under the prefix (or one archive key), limits, words)
S3_CASES: list[tuple[str, Callable[[], dict[str, bytes]], tuple[int, int] | None, str]] = [
    ("prefix-empty", lambda: {}, None, "is empty"),
    ("prefix-no-images", lambda: {"1_cat/a.txt": b"a cat"}, None, "contains no images"),
    ("prefix-key-climbs-out", lambda: {"1_cat/a.png": PNG, "1_cat/../../../../etc/x.png": PNG}, None,
     "'1_cat/../../../../etc/x.png' climbs out"),
    ("prefix-file-and-folder", lambda: {"1_cat/a": b"x", "1_cat/a/b.png": PNG}, None, "1_cat/a"),
    ("prefix-over-size-limit", lambda: {f"1_cat/{i}.png": PNG for i in range(4)}, (len(PNG) * 2, 100),
     "holds more than"),
    ("prefix-too-many-files", lambda: {f"1_cat/{i}.png": PNG for i in range(4)}, (MB, 2), "more than 2 files"),
    ("prefix-bomb-header", lambda: {"1_cat/a.png": png_header(30_000, 30_000)}, None, "'1_cat/a.png' is over"),
    ("prefix-unreadable-header", lambda: {"1_cat/a.png": PNG[:20]}, None, "'1_cat/a.png' is not a readable image"),
    ("archive-over-size-limit", lambda: {"d.zip": zip_bytes([(f"1_cat/{i}.png", PNG) for i in range(4)])},
     (len(PNG) * 2, 100), "over the limit"),
    ("archive-missing", lambda: {"other.zip": b""}, None, "does not exist"),
    ("tgz-on-s3-dotdot", lambda: {"d.tar.gz": tar_bytes([*good_members(), ("../../x.png", PNG)], mode="w:gz")}, None,
     "'../../x.png' climbs out"),
    ("archive-member-bomb-header", lambda: {"d.zip": zip_bytes([("1_cat/a.png", png_header(30_000, 30_000))])}, None,
     "member '1_cat/a.png' is over"),
]


@pytest.mark.parametrize("case, build, limits, words", S3_CASES, ids=[c[0] for c in S3_CASES])
def test_bad_dataset_on_s3_is_dataset_invalid(tmp_path, bi_s3, bi_bucket, case, build, limits, words):
    from trainer.job.fetch import fetch_dataset

    prefix = f"datasets/trainer/{case}"
    objects = build()
    for key, data in objects.items():
        bi_s3.put_object(Bucket=bi_bucket, Key=f"{prefix}/{key}", Body=data)
    archive = next((k for k in objects if k.endswith((".zip", ".tar.gz"))), None)
    if case == "archive-missing":
        archive = "missing.zip"
    uri = f"s3://{bi_bucket}/{prefix}" + (f"/{archive}" if archive else "")
    kwargs = {"max_bytes": limits[0], "max_files": limits[1]} if limits else {}
    dest = tmp_path / "dataset"
    with pytest.raises(JobFailure) as err:
        fetch_dataset(uri, str(dest), **kwargs)
    _check_failure(err.value, Reason.DATASET_INVALID, [words, uri])
    assert not dest.exists() and not list(tmp_path.glob("dataset.partial-*"))


# ------------------------------------------------------------------------------ pixels, captions


@pytest.fixture(scope="module")
def dataset_cls():
    from trainer.data.dataset import MAX_CAPTION_BYTES, TrainDataset
    from trainer.core.dataset.layout import discover_layout

    return TrainDataset, discover_layout, MAX_CAPTION_BYTES


def _train_spec():
    from trainer.core.spec import spec_from_obj

    return spec_from_obj({"version": 1, "model": {"uri": "m"}, "dataset": {"uri": "s3://b/d", "resolution": 64,
                                                                            "caption_extension": ".txt"}})


def _build(root: Path, files: dict[str, bytes], dataset_cls) -> Any:
    TrainDataset, discover_layout, _ = dataset_cls
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    spec = _train_spec()
    return TrainDataset(discover_layout(spec, names), spec, str(root))


# (id, the bad files next to one good image, the file the problem names, words)
PIXEL_CASES: list[tuple[str, Callable[[int], dict[str, bytes]], str, str]] = [
    ("png-truncated-pixels", lambda _: {"1_cat/b.png": PNG[: len(PNG) - 30]}, "1_cat/b.png", "cannot be decoded"),
    ("jpeg-truncated-pixels", lambda _: {"1_cat/b.jpg": image(fmt="JPEG")[:400]}, "1_cat/b.jpg", "cannot be decoded"),
    ("webp-truncated-pixels", lambda _: {"1_cat/b.webp": image(fmt="WEBP")[:60]}, "1_cat/b.webp",
     "cannot be decoded"),
    ("png-corrupt-pixels", lambda _: {"1_cat/b.png": PNG[:41] + bytes(len(PNG) - 41)}, "1_cat/b.png",
     "cannot be decoded"),
    ("caption-not-utf8", lambda _: {"1_cat/b.png": PNG, "1_cat/b.txt": b"caf\xe9 \xff\xfe latin-1"}, "1_cat/b.txt",
     "not UTF-8"),
    ("caption-utf16", lambda _: {"1_cat/b.png": PNG, "1_cat/b.txt": "a cat".encode("utf-16")}, "1_cat/b.txt",
     "not UTF-8"),
    ("caption-oversized", lambda limit: {"1_cat/b.png": PNG, "1_cat/b.txt": b"tag, " * (limit // 5 + 10)},
     "1_cat/b.txt", "larger than"),
]


@pytest.mark.parametrize("case, files, path, words", PIXEL_CASES, ids=[c[0] for c in PIXEL_CASES])
def test_bad_pixels_or_caption_skip_the_image_naming_the_file(tmp_path, dataset_cls, case, files, path, words):
    """With a good image beside it, the bad file is reported (a warning on the job) and skipped."""
    limit = dataset_cls[2]
    ds = _build(tmp_path, {"1_cat/a.png": PNG, "1_cat/a.txt": b"a cat", **files(limit)}, dataset_cls)
    assert [it.rel_path for it in ds.items] == ["1_cat/a.png"]
    assert len(ds.problems) == 1 and ds.problems[0].path == path and words in ds.problems[0].reason, ds.problems


@pytest.mark.parametrize("case, files, path, words", PIXEL_CASES, ids=[c[0] for c in PIXEL_CASES])
def test_nothing_left_is_dataset_invalid_naming_the_file(tmp_path, dataset_cls, case, files, path, words):
    limit = dataset_cls[2]
    with pytest.raises(JobFailure) as err:
        _build(tmp_path, files(limit), dataset_cls)
    _check_failure(err.value, Reason.DATASET_INVALID, [path, words, "no readable training image"])


# --------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def loader():
    import torch

    from trainer.models import load

    return load, torch


def _safetensors(path: Path, keys: list[str]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


SDXL_KEYS = ["conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.label_emb.0.0.weight",
             "model.diffusion_model.input_blocks.0.0.weight"]
SD2_KEYS = ["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"]


class _RunsCode:
    """Unpickling this runs `touch <marker>`: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_case(case: str, tmp: Path) -> tuple[Path, str, list[str]]:
    """(the model path, the arch the spec names, words the message must hold)."""
    import torch

    if case == "zero-byte-safetensors":
        (tmp / "m.safetensors").write_bytes(b"")
        return tmp / "m.safetensors", "sd1", ["empty file (0 bytes)"]
    if case == "zero-byte-ckpt":
        (tmp / "m.ckpt").write_bytes(b"")
        return tmp / "m.ckpt", "sd1", ["empty file (0 bytes)"]
    if case == "garbage-safetensors":
        (tmp / "m.safetensors").write_bytes(os.urandom(4096))
        return tmp / "m.safetensors", "sd1", ["not a readable .safetensors file"]
    if case == "safetensors-header-claims-1tb":
        (tmp / "m.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
        return tmp / "m.safetensors", "sd1", ["not a readable .safetensors file"]
    if case == "safetensors-truncated":
        data = _safetensors(tmp / "full.safetensors", SD2_KEYS).read_bytes()
        (tmp / "m.safetensors").write_bytes(data[: len(data) - 8])
        return tmp / "m.safetensors", "sd2", ["not a readable .safetensors file"]
    if case == "pickle-runs-code-zip-format":
        torch.save({"state_dict": {"x": _RunsCode(tmp / "PWNED")}}, tmp / "m.ckpt")
        return tmp / "m.ckpt", "sd1", ["weights-only torch checkpoint"]
    if case == "pickle-runs-code-legacy":
        with open(tmp / "m.ckpt", "wb") as fh:
            pickle.dump({"state_dict": _RunsCode(tmp / "PWNED")}, fh)
        return tmp / "m.ckpt", "sd1", ["weights-only torch checkpoint"]
    if case == "not-stable-diffusion":
        return _safetensors(tmp / "m.safetensors", ["encoder.layer.0.weight"]), "sd1", ["not a Stable Diffusion"]
    if case == "sdxl-file-as-sd1":
        return _safetensors(tmp / "m.safetensors", SDXL_KEYS), "sd1", ["is an SDXL model", "arch='sd1'"]
    if case == "sd2-ckpt-as-sdxl":
        torch.save({"state_dict": {k: torch.zeros(2, 2) for k in SD2_KEYS}}, tmp / "m.ckpt")
        return tmp / "m.ckpt", "sdxl", ["is an SD2.x model", "arch='sdxl'"]
    if case == "sdxl-folder-as-sd1":
        (tmp / "m" / "text_encoder_2").mkdir(parents=True)
        (tmp / "m" / "model_index.json").write_text("{}")
        return tmp / "m", "sd1", ["is an SDXL model", "arch='sd1'"]
    if case == "folder-without-model-index":
        (tmp / "m" / "unet").mkdir(parents=True)
        return tmp / "m", "sd1", ["has no model_index.json"]
    raise AssertionError(case)


MODEL_CASES = ["zero-byte-safetensors", "zero-byte-ckpt", "garbage-safetensors", "safetensors-header-claims-1tb",
               "safetensors-truncated", "pickle-runs-code-zip-format", "pickle-runs-code-legacy",
               "not-stable-diffusion", "sdxl-file-as-sd1", "sd2-ckpt-as-sdxl", "sdxl-folder-as-sd1",
               "folder-without-model-index"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_is_model_invalid(tmp_path, loader, case):
    """The calls `load_model` dispatches to (folder or single file; calling it would first import
    diffusers for nothing): the checks read the file's header only, so a bad model fails in seconds,
    naming the file, before anything is loaded."""
    load, torch = loader
    path, arch, words = _model_case(case, tmp_path)
    with pytest.raises(JobFailure) as err:
        if path.is_dir():
            load.load_folder(path, arch, torch.float32)
        else:
            load.load_single_file(path, arch, torch.float32)
    _check_failure(err.value, Reason.MODEL_INVALID, [*words, path.name])
    assert not (tmp_path / "PWNED").exists()  # the pickle's code never ran


# (id, objects under models/<case>/, the URI suffix, words)
S3_MODEL_CASES: list[tuple[str, dict[str, bytes], str, str]] = [
    ("s3-zero-byte-single-file", {"m.safetensors": b""}, "m.safetensors", "is empty (0 bytes)"),
    ("s3-zero-byte-in-folder", {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b""}, "",
     "unet/diffusion_pytorch_model.safetensors is empty"),
    ("s3-missing-file", {}, "m.safetensors", "does not exist"),
    ("s3-empty-folder", {}, "", "no model at"),
    ("s3-key-climbs-out", {"model_index.json": b"{}", "unet/../../../../x.safetensors": b"x"}, "", "climbs out"),
]


@pytest.mark.parametrize("case, objects, suffix, words", S3_MODEL_CASES, ids=[c[0] for c in S3_MODEL_CASES])
def test_bad_model_on_s3_is_model_invalid_before_download(tmp_path, bi_s3, bi_bucket, case, objects, suffix, words):
    from trainer.job.fetch import ensure_model

    prefix = f"models/bad/{case}"
    for key, data in objects.items():
        bi_s3.put_object(Bucket=bi_bucket, Key=f"{prefix}/{key}", Body=data)
    uri = f"s3://{bi_bucket}/{prefix}/{suffix}".rstrip("/")
    with pytest.raises(JobFailure) as err:
        ensure_model(uri, str(tmp_path / "cache"))
    _check_failure(err.value, Reason.MODEL_INVALID, [words])
    assert not list((tmp_path / "cache").rglob("*.complete")) if (tmp_path / "cache").exists() else True


# ---------------------------------------------------------------------------------------- checks


def _check_failure(failure: JobFailure, reason: Reason, words: list[str]) -> None:
    assert failure.reason == reason, failure
    for word in words:
        assert word in failure.message, (word, failure.message)
    for marker in LEAK_MARKERS:
        assert marker not in failure.message, failure.message
    assert failure.exit_code not in (1, 20, 21)  # final, not retried: another attempt cannot help
