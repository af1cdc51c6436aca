"""The dataset report through the API on the local S3 server: generated datasets with planted
near-duplicates, uncaptioned images and orphan captions; bad inputs are 422s naming the field."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import auth, put


@pytest.fixture
def api(client_factory):
    return client_factory(launcher="none", reconcile_interval_s=0)


def picture(seed: int, w: int = 96, h: int = 64, fmt: str = "PNG") -> bytes:
    """A smooth random picture (distinct per seed); re-encoding it as JPEG keeps its dHash close."""
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 6, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(buf, fmt)
    return buf.getvalue()


def make_dataset(s3, bucket: str) -> str:
    prefix = f"datasets/report-{uuid.uuid4().hex[:8]}"
    for i in range(6):
        put(s3, bucket, f"{prefix}/10_hero/{i}.png", picture(i))
        if i != 2:
            put(s3, bucket, f"{prefix}/10_hero/{i}.txt", b"hero, red_hair, sword" if i % 2 else b"hero, smile")
    # planted: a JPEG copy of 0.png at another size, in another concept, without a caption
    put(s3, bucket, f"{prefix}/3_extra/copy.jpg", picture(0, 192, 128, "JPEG"))
    put(s3, bucket, f"{prefix}/3_extra/tall.png", picture(9, 64, 128))
    put(s3, bucket, f"{prefix}/3_extra/tall.txt", b"hero, standing")
    put(s3, bucket, f"{prefix}/3_extra/gone.txt", b"orphan")
    return f"s3://{bucket}/{prefix}"


def test_report_names_concepts_buckets_tags_uncaptioned_and_duplicates(api, s3, bucket):
    uri = make_dataset(s3, bucket)
    body = {"uri": uri, "caption_extension": ".txt", "resolution": 64, "enable_bucket": True,
            "min_bucket_reso": 32, "bucket_reso_steps": 32, "subject": "character", "epochs": 10}
    resp = api.post("/v1/datasets:report", json=body, headers=auth())
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["images"] == 8
    assert {c["name"]: (c["images"], c["repeats"], c["without_caption"]) for c in r["concepts"]} == {
        "10_hero": (6, 10, 1), "3_extra": (2, 3, 1)}
    assert r["image_steps_per_epoch"] == 66 and r["total_image_steps"] == 660
    by_path = {i["path"]: i for i in r["image_list"]}
    assert by_path["3_extra/tall.png"]["aspect"] == 0.5 and by_path["3_extra/tall.png"]["bucket"] == [32, 96]
    assert by_path["10_hero/0.png"]["bucket"] == [64, 64]  # 1.5 is nearer 1 than 3 (96x32)
    # ss_tag_frequency: per folder; an uncaptioned image counts its folder's class tokens
    assert r["tag_frequency"]["10_hero"] == {"hero": 6, "red_hair": 3, "sword": 3, "smile": 2}
    assert r["tag_frequency"]["3_extra"] == {"hero": 1, "standing": 1, "extra": 1}
    assert sorted(r["without_caption"]) == ["10_hero/2.png", "3_extra/copy.jpg"]
    assert r["orphan_captions"] == ["3_extra/gone.txt"]
    assert r["duplicates"] == [["10_hero/0.png", "3_extra/copy.jpg"]]
    assert r["hashed"] == 8
    text = " ".join(r["warnings"])
    assert "50–100 for a character" in text and "660 image-steps in total" in text
    # GET with the same query answers the same report
    got = api.get("/v1/datasets/report", params={"uri": uri, "caption_extension": ".txt", "resolution": 64,
                                                 "duplicates": "false"}, headers=auth())
    assert got.status_code == 200, got.text
    assert got.json()["duplicates"] is None and got.json()["without_caption"] == r["without_caption"]


def test_report_from_a_zip(api, s3, bucket):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("1_cat/a.png", picture(1))
        zf.writestr("1_cat/a.caption", "cat")
        zf.writestr("1_cat/b.png", picture(1))
    key = f"datasets/{uuid.uuid4().hex[:8]}.zip"
    put(s3, bucket, key, buf.getvalue())
    r = api.post("/v1/datasets:report", json={"uri": f"s3://{bucket}/{key}"}, headers=auth()).json()
    assert r["images"] == 2 and r["without_caption"] == ["1_cat/b.png"]
    assert r["duplicates"] == [["1_cat/a.png", "1_cat/b.png"]]


@pytest.mark.parametrize("body, path, words", [
    ({"uri": "s3://elsewhere/datasets/x"}, "uri", "outside the dataset locations"),
    ({"uri": "s3://{b}/private/x"}, "uri", "outside the dataset locations"),
    ({"uri": "s3://{b}/datasets/{flat}"}, "uri", "<repeats>_<concept>"),
    ({"uri": "s3://{b}/datasets/missing-{u}"}, "uri", "nothing found"),
    ({"uri": "s3://{b}/datasets/tiny", "resolution": 4}, "resolution", ">= 32"),
    ({"uri": "s3://{b}/datasets/tiny", "subject": "landscape"}, "subject", "character"),
    ({"uri": "s3://{b}/datasets/tiny", "bogus": 1}, "bogus", "unknown field"),
])
def test_bad_report_requests_are_422_naming_the_field(api, s3, bucket, body, path, words):
    unique = uuid.uuid4().hex[:8]
    put(s3, bucket, f"datasets/flat-{unique}/a.png", picture(1))
    body = {k: v.format(b=bucket, u=unique, flat=f"flat-{unique}") if isinstance(v, str) else v
            for k, v in body.items()}
    resp = api.post("/v1/datasets:report", json=body, headers=auth())
    assert resp.status_code == 422, resp.text
    problems = resp.json()["problems"]
    assert any(p["path"] == path and words in p["message"] for p in problems), problems


def test_report_needs_a_token_and_is_in_the_openapi_document(api, bucket):
    assert api.post("/v1/datasets:report", json={"uri": f"s3://{bucket}/datasets/tiny"}).status_code == 401
    doc = api.get("/schema/openapi.json").json()
    assert "/v1/datasets:report" in doc["paths"] and "/v1/datasets/report" in doc["paths"]
    assert "DatasetReportRequest" in doc["components"]["schemas"]


def test_report_reads_are_bounded(s3, bucket):
    """Past the byte budgets the duplicate check names what it skipped and tag counts say they are partial."""
    from service.jobs.datareport import ReportLimits, run_report
    from service.api.wire import DatasetReportRequest

    uri = make_dataset(s3, bucket)
    limits = ReportLimits(hash_images=3, captions_total_bytes=30)
    r = run_report(DatasetReportRequest(uri=uri, caption_extension=".txt"), limits)
    assert r.hashed == 3 and len(r.not_hashed) == 5
    assert any("caption files were read" in w and "partial" in w for w in r.warnings)
