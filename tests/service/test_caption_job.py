"""Bare images → a `kind = "caption"` job with the tiny WD14-format tagger → a training job on the
captioned version, through the API and the `lathe` CLI with the local launcher and the real trainer
processes. Also: a model-free tag-operations job, the 422s at submit and the job failure naming the
file when the tagger's graph is wrong (only the trainer loads it)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import REPO, put
from tests.service.test_cli import lathe
from tests.tagger_helpers import build_tagger
from trainer.caption.tagger import Tagger, TaggerOptions, select_tags

pytestmark = pytest.mark.slow


def upload_folder(s3, bucket: str, local: Path, prefix: str) -> str:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def bare_images(s3, bucket: str, prefix: str, n: int = 20) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    images = []
    for i in range(n):
        im = Image.fromarray((rng.random((64, 64, 3)) * rng.random(3) * 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        put(s3, bucket, f"{prefix}/5_thing/{i:02d}.png", buf.getvalue())
        images.append(im)
    return images


def job_output_prefix(record: dict, bucket: str) -> str:
    """The job's output folder (where caption-report.json was published), as a key prefix."""
    report = next(o for o in record["outputs"] if o["name"] == "caption-report.json")
    return report["uri"].removeprefix(f"s3://{bucket}/").removesuffix("caption-report.json")


def test_bare_images_to_captions_to_a_trained_lora(live_server_factory, bucket, s3, tmp_path):
    server = live_server_factory(trainer_command=None, heartbeat_timeout_s=120, max_running_jobs=1)
    images = bare_images(s3, bucket, "datasets/bare")
    tagger_dir = build_tagger(tmp_path / "tagger")
    tagger_uri = upload_folder(s3, bucket, tagger_dir, "models/tagger")

    # 422s at submit: each names its field, nothing is launched.
    bad = [
        (["--model", f"s3://{bucket}/models/tiny"], "model.uri"),  # a folder without selected_tags.csv
        (["--model", tagger_uri, "--thresh", "1.5"], "caption.thresh"),
        (["--model", tagger_uri, "--output-uri", f"s3://{bucket}/results/globex/x"], "caption.output_uri"),
    ]
    for extra, field in bad:
        proc = lathe(server, "caption", f"s3://{bucket}/datasets/bare", *extra, check=False)
        assert proc.returncode == 1 and "422" in proc.stderr and field in proc.stderr, (extra, proc.stderr)
    put(s3, bucket, "datasets/noimages/5_x/a.txt", b"just a caption")
    proc = lathe(server, "caption", f"s3://{bucket}/datasets/noimages", "--model", tagger_uri, check=False)
    assert proc.returncode == 1 and "422" in proc.stderr and "dataset" in proc.stderr, proc.stderr

    # The caption job: 20 caption files, thresholds as the model scores them, trigger first, no '_'.
    job_id = lathe(server, "caption", f"s3://{bucket}/datasets/bare", "--model", tagger_uri, "--trigger", "sks",
                   "--thresh", "0.4", "--character-threshold", "0.6").stdout.strip()
    watched = lathe(server, "status", job_id, "--watch", check=False)
    record = json.loads(lathe(server, "status", job_id, "--json").stdout)
    assert record["phase"] == "succeeded", (watched.stdout, lathe(server, "logs", job_id).stdout)
    out = job_output_prefix(record, bucket)
    keys = {o["Key"].removeprefix(f"{out}dataset/")
            for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{out}dataset/")["Contents"]}
    assert sorted(k for k in keys if k.endswith(".txt")) == [f"5_thing/{i:02d}.txt" for i in range(20)]
    assert sorted(k for k in keys if k.endswith(".png")) == [f"5_thing/{i:02d}.png" for i in range(20)]
    options = TaggerOptions(thresh=0.4, character_threshold=0.6, trigger_word="sks")
    tagger = Tagger.load(tagger_dir, options)
    scores = tagger.scores(images)
    for i in range(20):
        caption = s3.get_object(Bucket=bucket, Key=f"{out}dataset/5_thing/{i:02d}.txt")["Body"].read().decode()
        assert caption == ", ".join(select_tags(scores[i], tagger.tags, options))
        tags = caption.split(", ")
        assert tags[0] == "sks" and not any("_" in t for t in tags if len(t) > 3)
    assert any(len(c.split(", ")) > 1 for c in [", ".join(select_tags(r, tagger.tags, options)) for r in scores])
    assert not any(o["Key"].endswith(".txt") for o in
                   s3.list_objects_v2(Bucket=bucket, Prefix="datasets/bare/").get("Contents", []))  # source unchanged
    captioned = f"s3://{bucket}/{out}dataset"

    # A model-free tag-operations job on the captioned version: "sks" removed everywhere, a new version.
    ops_id = lathe(server, "caption", captioned, "--remove", "sks").stdout.strip()
    lathe(server, "status", ops_id, "--watch", check=False)
    ops = json.loads(lathe(server, "status", ops_id, "--json").stdout)
    assert ops["phase"] == "succeeded", lathe(server, "logs", ops_id).stdout
    ops_out = job_output_prefix(ops, bucket)
    first = s3.get_object(Bucket=bucket, Key=f"{ops_out}dataset/5_thing/00.txt")["Body"].read().decode()
    assert "sks" not in first.split(", ")
    assert s3.get_object(Bucket=bucket, Key=f"{out}dataset/5_thing/00.txt")["Body"].read().decode().startswith("sks")

    # A tagger whose graph takes the wrong input shape: only the trainer loads it, the job fails naming it.
    wrong = build_tagger(tmp_path / "wrong", channels=4)
    wrong_uri = upload_folder(s3, bucket, wrong, "models/wrong-tagger")
    wrong_id = lathe(server, "caption", f"s3://{bucket}/datasets/bare", "--model", wrong_uri).stdout.strip()
    lathe(server, "status", wrong_id, "--watch", check=False)
    failed = json.loads(lathe(server, "status", wrong_id, "--json", check=False).stdout)
    assert failed["phase"] == "failed" and failed["error"]["reason"] == "model_invalid", failed
    assert f"model.uri: {wrong_uri}/model.onnx: input" in failed["error"]["message"], failed["error"]

    # Training on the captioned version trains and succeeds.
    model = tmp_path / "tiny-sd1"
    subprocess.run([sys.executable, "-m", "trainer", "tiny-model", "--arch", "sd1", str(model)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    model_uri = upload_folder(s3, bucket, model, "models/tiny-sd1")
    train = {"version": 1, "name": "captioned", "model": {"uri": model_uri, "arch": "sd1"},
             "dataset": {"uri": captioned, "resolution": 64, "caption_extension": ".txt", "keep_tokens": 1,
                         "shuffle_caption": True},
             "network": {"algo": "lora", "dim": 2, "alpha": 1}, "training": {"max_train_steps": 2, "seed": 0},
             "logging": {"log_with": "none"}, "resources": {"gpus": 0, "max_attempts": 1}}
    (tmp_path / "train.json").write_text(json.dumps(train))
    train_id = lathe(server, "submit", str(tmp_path / "train.json")).stdout.strip()
    lathe(server, "status", train_id, "--watch", check=False)
    trained = json.loads(lathe(server, "status", train_id, "--json").stdout)
    assert trained["phase"] == "succeeded", lathe(server, "logs", train_id).stdout
    assert trained["progress"]["step"] == 2
    assert any(o["kind"] == "adapter" for o in trained["outputs"])
