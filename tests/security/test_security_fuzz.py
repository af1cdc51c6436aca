"""Property-based fuzzing (hypothesis) of everything that parses untrusted input: the spec decoder, the
image-header readers, the archive extractor, the preflight's archive reader, dataset discovery and the
tenant prefix check. Each may only answer with its documented error (SpecError, UnreadableImage,
JobFailure(dataset_invalid), a report with problems), never crash. Bounded for CI: ~150 examples per
property, no per-example deadline, a few seconds in all."""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import tempfile
import zipfile
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.common_helpers import image_bytes
from trainer.core.failures import JobFailure, Reason

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)


def _valid_spec() -> dict[str, Any]:
    return {"version": 1, "model": {"uri": "s3://m/base"}, "dataset": {"uri": "s3://d/set", "resolution": 64},
            "training": {"max_train_steps": 3}}


def _field_paths() -> list[str]:
    """Every dotted field path of JobSpec (nested structs expanded), for targeted mutations."""
    import msgspec

    from trainer.core.spec import JobSpec

    out: list[str] = []

    def walk(tp: Any, prefix: str) -> None:
        for field in msgspec.structs.fields(tp):
            path = f"{prefix}{field.name}"
            out.append(path)
            if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
                walk(field.type, path + ".")

    walk(JobSpec, "")
    return out


FIELD_PATHS = _field_paths()


# ------------------------------------------------------------------------------------------ spec


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decode_spec_on_arbitrary_bytes(data):
    from trainer.core.spec import SpecError, decode_spec

    try:
        decode_spec(data)
    except SpecError as exc:
        assert exc.problems and all(p.path and p.message for p in exc.problems)


@FUZZ
@given(JSON)
def test_spec_from_arbitrary_json(obj):
    from trainer.core.spec import SpecError, spec_from_obj

    try:
        spec_from_obj(obj)
    except SpecError as exc:
        assert exc.problems


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELD_PATHS), JSON), min_size=1, max_size=3))
def test_mutated_specs_are_refused_cleanly_or_round_trip(changes):
    """Whatever is accepted can be stored (spec.json) and read back by the trainer unchanged."""
    from trainer.core.spec import SpecError, decode_spec, encode_spec, spec_from_obj

    doc = _valid_spec()
    for path, value in changes:
        node = doc
        *parents, last = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    try:
        spec = spec_from_obj(doc)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p.message, str) and p.message for p in exc.problems)
        return
    assert decode_spec(encode_spec(spec)) == spec


# ---------------------------------------------------------------------------------------- images


SEEDS = [image_bytes(40, 24, (1, 2, 3), fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP")]


@st.composite
def mutated(draw: Any, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@FUZZ
@given(mutated(SEEDS) | st.binary(max_size=200))
def test_image_header_readers(data):
    from trainer.core.images import UnreadableImage, header_size, image_size

    try:
        w, h = image_size(lambda n: data[:n], len(data), first_bytes=1024)
        assert w > 0 and h > 0
    except UnreadableImage as exc:
        assert " object at 0x" not in str(exc)
    try:
        header_size(io.BytesIO(data))  # the trainer's read of a downloaded file
    except ValueError:
        pass


# -------------------------------------------------------------------------------------- archives

NAMES = st.text(alphabet="ab./\\:_-1é\x00", min_size=1, max_size=12)


@st.composite
def archives(draw: Any) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["zip", "tar", "tar.gz"]))
    names = draw(st.lists(NAMES, min_size=1, max_size=4))
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name in names:
                info = zipfile.ZipInfo(name.replace("\x00", ""))
                if draw(st.booleans()):
                    info.external_attr = draw(st.sampled_from([0o120777, 0o100644, 0o040755, 0o010644])) << 16
                zf.writestr(info, draw(st.binary(max_size=40)))
    else:
        with tarfile.open(fileobj=buf, mode="w:gz" if kind == "tar.gz" else "w") as tf:
            for name in names:
                info = tarfile.TarInfo(name.replace("\x00", ""))
                info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                                  tarfile.LNKTYPE, tarfile.FIFOTYPE]))
                if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = draw(NAMES).replace("\x00", "")
                data = draw(st.binary(max_size=40)) if info.type == tarfile.REGTYPE else b""
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 3))):  # and sometimes damage it
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return kind, bytes(data)


@FUZZ
@given(archives())
def test_archive_extraction_stays_inside_its_folder(archive):
    from trainer.job.fetch import _Limits, extract_archive

    kind, data = archive
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"a.{kind}")
        with open(path, "wb") as fh:
            fh.write(data)
        dest = os.path.join(tmp, "out", "dest")
        os.makedirs(dest)
        try:
            extract_archive(path, dest, limits=_Limits(10 * 1024 * 1024, 100, 10**8))
        except JobFailure as exc:
            assert exc.reason == Reason.DATASET_INVALID
        outside = [os.path.join(root, f) for root, dirs, files in os.walk(tmp) for f in files + dirs
                   if not os.path.join(root, f).startswith(dest) and os.path.join(root, f) not in (path, dest)
                   and os.path.join(root, f) != os.path.join(tmp, "out")]
        assert outside == []
        for root, dirs, files in os.walk(dest):
            for f in files + dirs:
                assert not os.path.islink(os.path.join(root, f))


@FUZZ
@given(archives())
def test_preflight_reads_any_archive_without_crashing(archive):
    from service.jobs.preflight import PreflightLimits, run_preflight
    from trainer.core.spec import spec_from_obj

    kind, data = archive
    assume(kind != "tar.gz")  # compressed tarballs are not opened by the preflight
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"a.{kind}")
        with open(path, "wb") as fh:
            fh.write(data)
        spec = spec_from_obj({"version": 1, "model": {"uri": "m"}, "dataset": {"uri": path, "resolution": 64}})
        report = run_preflight(spec, PreflightLimits(max_files=50, workers=1, header_bytes=1024))
        assert report.problems or report.images  # it either found images or said why not


@FUZZ
@given(st.lists(st.text(alphabet="ab1_./ .txtpng", min_size=1, max_size=14), max_size=12),
       st.sampled_from([None, ".txt", ".caption"]))
def test_dataset_discovery_on_any_listing(files, extension):
    from trainer.core.dataset.layout import discover_layout
    from trainer.core.spec import spec_from_obj

    dataset: dict[str, Any] = {"uri": "s3://d/x"}
    if extension:
        dataset["caption_extension"] = extension
    spec = spec_from_obj({"version": 1, "model": {"uri": "m"}, "dataset": dataset})
    try:
        layout = discover_layout(spec, files)
    except JobFailure as exc:
        assert exc.reason in (Reason.DATASET_INVALID, Reason.SPEC_INVALID)
        return
    assert layout.num_images > 0


TOML_KEYS = st.sampled_from([
    "resolution", "batch_size", "enable_bucket", "image_dir", "num_repeats", "class_tokens", "caption_extension",
    "is_reg", "keep_tokens", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "shuffle_caption", "caption_separator", "keep_tokens_separator", "enable_wildcard", "caption_prefix",
    "caption_dropout_rate", "caption_dropout_every_n_epochs", "alpha_mask", "bogus"])
TOML_VALUES = (st.booleans() | st.integers(-5, 3000) | st.floats(-2, 3000) | st.text(alphabet="ab1_./ ", max_size=8)
               | st.lists(st.integers(0, 2000), max_size=3))


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@st.composite
def dataset_tomls(draw: Any) -> str:
    """sd-scripts dataset configs with any of its keys holding values of any type."""
    def table() -> str:
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in draw(st.dictionaries(TOML_KEYS, TOML_VALUES,
                                                                                     max_size=5)).items())
    parts = ["[general]\n" + table()]
    for _ in range(draw(st.integers(0, 2))):
        parts.append("[[datasets]]\n" + table())
        parts += ["[[datasets.subsets]]\n" + table() for _ in range(draw(st.integers(0, 2)))]
    return "\n".join(parts)


@FUZZ
@given(dataset_tomls())
def test_dataset_config_toml_with_any_values(text):
    from trainer.core.dataset.layout import discover_layout
    from trainer.core.spec import SpecError, spec_from_obj

    try:
        spec = spec_from_obj({"version": 1, "model": {"uri": "m"}, "dataset": {"uri": "s3://d/x", "config_toml": text}})
    except SpecError:
        return
    try:
        discover_layout(spec, ["1_cat/a.png", "1_cat/a.txt", "2_cat/b.jpg", "a/1.png", "ab/b.png"])
    except JobFailure as exc:
        assert exc.reason in (Reason.DATASET_INVALID, Reason.SPEC_INVALID)


# ------------------------------------------------------------------------------------ tenancy

SEGMENTS = st.sampled_from(["acme", "acme-evil", "other", "..", ".", "", "x", "%2e%2e", "tenants", "a\\b"])


@FUZZ
@given(st.lists(SEGMENTS, min_size=1, max_size=6), st.booleans())
def test_a_uri_allowed_under_a_prefix_really_is_under_it(segments, trailing):
    from service.tenants import uri_under

    prefix = "s3://bucket/state/tenants/acme/"
    uri = "s3://bucket/state/tenants/" + "/".join(segments) + ("/" if trailing else "")
    if uri_under(uri, prefix):
        path = uri.removeprefix("s3://bucket/")
        assert posixpath.normpath(path).startswith("state/tenants/acme")
        assert (path + "/").startswith("state/tenants/acme/")
        assert ".." not in path.split("/") and "\\" not in path


@pytest.mark.parametrize("uri", ["s3://bucket/state/tenants/acme-evil/x", "s3://bucket/state/tenants/acme/../x",
                                 "s3://bucket/state/tenants/acme//x", "s3://bucket/state/tenants/acme\\..\\x"])
def test_known_escapes_are_refused(uri):
    from service.tenants import uri_under

    assert not uri_under(uri, "s3://bucket/state/tenants/acme/")
