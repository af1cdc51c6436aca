"""Dataset fetching: S3 prefixes and archives into a folder, with path, size and pixel safety."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from storage_helpers import make_dataset, png_bytes, read_tree

from tests.common_helpers import png_header
from trainer.core.failures import JobFailure, Reason
from trainer.job.fetch import fetch_dataset
from trainer.core.storage import open_store


def upload_tree(bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    store = open_store(f"s3://{bucket}/{prefix}")
    for rel, data in files.items():
        store.put_bytes(rel, data)


def zip_bytes(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # what `zip --symlinks` records
            zf.writestr(info, target)
    return out.getvalue()


def tar_bytes(members: dict[str, bytes], *, extra: list[tarfile.TarInfo] = (), mode: str = "w:gz") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return out.getvalue()


def refused(call, *fragments: str) -> str:
    with pytest.raises(JobFailure) as err:
        call()
    assert err.value.reason == Reason.DATASET_INVALID and err.value.exit_code == 11
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message
    return err.value.message


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, bytes]:
    return make_dataset(tmp_path / "src")


def test_prefix_download_matches_the_source(s3_bucket, dataset, tmp_path) -> None:
    upload_tree(s3_bucket, "datasets/ds1", dataset)
    # Debris from macOS and folder placeholders are not part of the dataset.
    upload_tree(s3_bucket, "datasets/ds1", {"__MACOSX/10_cat/._img0.png": b"junk", ".DS_Store": b"junk"})
    open_store(f"s3://{s3_bucket}").put_bytes("datasets/ds1/empty-folder/", b"")
    dest = tmp_path / "work" / "dataset"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_bytes(b"from an earlier attempt")

    got = fetch_dataset(f"s3://{s3_bucket}/datasets/ds1", str(dest))

    assert got == str(dest)
    assert read_tree(dest) == dataset
    assert os.listdir(tmp_path / "work") == ["dataset"]  # no staging folder left behind


def test_prefix_limits_stop_the_transfer_and_leave_nothing(s3_bucket, dataset, tmp_path, monkeypatch) -> None:
    # The listing is vetted while the transfer already runs; two keys per LIST page puts the refusal
    # pages after the start, with the first objects' transfers already running.
    monkeypatch.setattr("trainer.core.storage.S3Store.page_size", 2)
    monkeypatch.setattr("trainer.job.fetch._FIRST_PAGE", 2)  # else the first page would hold the whole dataset
    upload_tree(s3_bucket, "ds", dataset)
    uri = f"s3://{s3_bucket}/ds/"
    refused(lambda: fetch_dataset(uri, str(tmp_path / "a"), max_files=5), "more than 5 files")
    refused(lambda: fetch_dataset(uri, str(tmp_path / "b"), max_bytes=100), "more than 100 bytes")
    refused(lambda: fetch_dataset(f"s3://{s3_bucket}/nothing", str(tmp_path / "c")), "is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial tree left


def test_file_and_folder_of_the_same_name_is_refused(s3_bucket, tmp_path) -> None:
    upload_tree(s3_bucket, "ds", {"1_a/x.png": png_bytes(), "1_a/x.png/y.png": png_bytes()})
    refused(lambda: fetch_dataset(f"s3://{s3_bucket}/ds", str(tmp_path / "d")), "'1_a/x.png'", "both a file and")
    assert list(tmp_path.iterdir()) == []


def test_prefix_key_climbing_out_is_refused(s3_bucket, tmp_path) -> None:
    upload_tree(s3_bucket, "ds", {"1_a/x.png": png_bytes(), "1_a/../../../evil.png": png_bytes()})
    refused(lambda: fetch_dataset(f"s3://{s3_bucket}/ds", str(tmp_path / "d")), "evil.png", "'..'")
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar"])
def test_archive_on_s3_is_extracted(s3_bucket, dataset, tmp_path, kind) -> None:
    members = {f"./{k}" if kind == "tar" else k: v for k, v in dataset.items()}
    members["__MACOSX/10_cat/._img0.png"] = b"resource fork"
    data = zip_bytes(members) if kind == "zip" else tar_bytes(members, mode="w:gz" if kind == "tar.gz" else "w")
    open_store(f"s3://{s3_bucket}").put_bytes(f"uploads/ds.{kind}", data)
    dest = tmp_path / "dataset"
    assert fetch_dataset(f"s3://{s3_bucket}/uploads/ds.{kind}", str(dest)) == str(dest)
    assert read_tree(dest) == dataset
    assert sorted(os.listdir(tmp_path)) == ["dataset", "src"]  # the archive itself is gone


def test_local_archive_and_local_folder(dataset, tmp_path) -> None:
    archive = tmp_path / "ds.zip"
    archive.write_bytes(zip_bytes(dataset))
    dest = tmp_path / "out"
    assert fetch_dataset(str(archive), str(dest)) == str(dest)
    assert read_tree(dest) == dataset
    # A local folder is used in place, after the same header checks.
    assert fetch_dataset(str(tmp_path / "src"), str(tmp_path / "unused")) == str(tmp_path / "src")
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    "members, fragment",
    [
        ({"1_a/x.png": b"", "../evil.png": b"x"}, "'../evil.png'"),
        ({"1_a/../../evil.png": b"x"}, "'1_a/../../evil.png'"),
        ({"/etc/evil.png": b"x"}, "absolute path"),
        ({"C:/evil.png": b"x"}, "absolute path"),
        ({"..\\evil.png": b"x"}, "'..\\\\evil.png'"),
    ],
)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_members_escaping_the_folder_are_refused(tmp_path, members, fragment, kind) -> None:
    archive = tmp_path / f"bad.{kind}"
    archive.write_bytes(zip_bytes(members) if kind == "zip" else tar_bytes(members))
    refused(lambda: fetch_dataset(str(archive), str(tmp_path / "x" / "dest")), fragment, "member")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "x" / "evil.png").exists()
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_links_in_archives_are_refused(tmp_path) -> None:
    sym = tarfile.TarInfo("1_a/link.png")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("1_a/hard.png")
    hard.type, hard.linkname = tarfile.LNKTYPE, "1_a/x.png"
    fifo = tarfile.TarInfo("1_a/pipe")
    fifo.type = tarfile.FIFOTYPE
    cases = [
        (tar_bytes({"1_a/x.png": png_bytes()}, extra=[sym]), "tar.gz", "'1_a/link.png' is a symbolic link"),
        (tar_bytes({"1_a/x.png": png_bytes()}, extra=[hard]), "tar.gz", "'1_a/hard.png' is a hard link"),
        (tar_bytes({}, extra=[fifo]), "tar.gz", "'1_a/pipe' is a device, FIFO"),
        (zip_bytes({"1_a/x.png": png_bytes()}, symlinks={"1_a/l.png": "../../x"}), "zip",
         "'1_a/l.png' is a symbolic link"),
    ]
    for data, kind, fragment in cases:
        archive = tmp_path / f"links.{kind}"
        archive.write_bytes(data)
        refused(lambda: fetch_dataset(str(archive), str(tmp_path / "dest")), fragment)
        assert not (tmp_path / "dest").exists()


def test_archive_bombs_are_refused(tmp_path) -> None:
    zeros = b"\0" * (3 * 1024 * 1024)
    # A zip declares its sizes: refused before anything is written.
    bomb_zip = tmp_path / "bomb.zip"
    bomb_zip.write_bytes(zip_bytes({"1_a/a.png": png_bytes(), "1_a/zeros.bin": zeros}))
    assert bomb_zip.stat().st_size < 20_000
    refused(lambda: fetch_dataset(str(bomb_zip), str(tmp_path / "d"), max_bytes=1024 * 1024),
            "expands to", "archive bomb")
    # A compressed tar is counted as it streams: refused when the count crosses the limit.
    bomb_tar = tmp_path / "bomb.tar.gz"
    bomb_tar.write_bytes(tar_bytes({"1_a/a.png": png_bytes(), "1_a/zeros.bin": zeros}))
    refused(lambda: fetch_dataset(str(bomb_tar), str(tmp_path / "d"), max_bytes=1024 * 1024),
            "'1_a/zeros.bin'", "archive bomb")
    many = tmp_path / "many.zip"
    many.write_bytes(zip_bytes({f"1_a/{i}.txt": b"x" for i in range(6)}))
    refused(lambda: fetch_dataset(str(many), str(tmp_path / "d"), max_files=5), "more than 5 files")
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz", "bomb.zip", "many.zip"]


def test_damaged_archive_is_refused(tmp_path) -> None:
    good = zip_bytes({"1_a/x.png": png_bytes()})
    archive = tmp_path / "cut.zip"
    archive.write_bytes(good[: len(good) // 2])
    refused(lambda: fetch_dataset(str(archive), str(tmp_path / "d")), "cut.zip")


def test_images_over_the_pixel_limit_are_refused_from_the_header(s3_bucket, tmp_path) -> None:
    # 9000x9000 with no pixel data: only a header read can tell its size.
    upload_tree(s3_bucket, "ds", {"1_a/ok.png": png_bytes(), "1_a/huge.png": png_header(9000, 9000)})
    refused(lambda: fetch_dataset(f"s3://{s3_bucket}/ds", str(tmp_path / "d")),
            "'1_a/huge.png' is 9000x9000 = 81000000 pixels", "not decoded")
    # So large that PIL's own decompression-bomb guard answers first.
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"1_a/bomb.png": png_header(100_000, 100_000)}))
    refused(lambda: fetch_dataset(str(archive), str(tmp_path / "d")), "member '1_a/bomb.png'", "limit")
    # The limit is the caller's: a 40x30 image fails a 1000-pixel limit.
    folder = tmp_path / "local"
    (folder / "1_a").mkdir(parents=True)
    (folder / "1_a" / "p.png").write_bytes(png_bytes(40, 30))
    refused(lambda: fetch_dataset(str(folder), str(tmp_path / "d"), max_pixels=1000), "40x30 = 1200")
    assert not (tmp_path / "d").exists()


def test_unreadable_or_missing_images_are_refused(tmp_path) -> None:
    folder = tmp_path / "ds"
    (folder / "1_a").mkdir(parents=True)
    (folder / "1_a" / "x.png").write_bytes(png_bytes())
    (folder / "1_a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    refused(lambda: fetch_dataset(str(folder), str(tmp_path / "d")), "'1_a/broken.jpg' is not a readable image")
    captions_only = tmp_path / "captions"
    captions_only.mkdir()
    (captions_only / "a.txt").write_text("a cat")
    refused(lambda: fetch_dataset(str(captions_only), str(tmp_path / "d")), "contains no images")
    refused(lambda: fetch_dataset(str(tmp_path / "nope"), str(tmp_path / "d")), "does not exist")
    (tmp_path / "plain.txt").write_text("x")
    refused(lambda: fetch_dataset(str(tmp_path / "plain.txt"), str(tmp_path / "d")), "not an archive")


def test_tree_download_ignores_objects_outside_the_vetted_listing(s3_bucket, tmp_path) -> None:
    # Objects that appear after the listing was vetted, including keys that climb out ('..'):
    # a key like `ds/../../evil.png` names a place two levels above the target; nothing may land there.
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("ds/1_a/x.png", b"x" * 10)
    vetted = list(store.list("ds/"))
    for key in ["ds/../../evil.png", "ds/1_a/../../../evil2.png", "ds/late.png"]:
        store.put_bytes(key, b"late")
    dest = tmp_path / "a" / "b" / "dest"
    store.download_many([(info, dest / info.key[3:]) for info in vetted])
    assert read_tree(tmp_path) == {"a/b/dest/1_a/x.png": b"x" * 10}
