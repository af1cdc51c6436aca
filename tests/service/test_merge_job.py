"""A `kind = "merge"` job through the API with the REAL trainer: it succeeds with a checkpoint whose
weights moved by the adapter, shows its kind, and an adapter of another model fails it with
`adapter_mismatch`; a ratio out of range is a 422 at submit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import REPO, auth, wait_finished

pytestmark = pytest.mark.slow


def _header_only(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 4


def _assets(tmp: Path) -> tuple[Path, Path, Path]:
    """The tiny SD1 single file, a LoRA on two of its attention layers, and one naming layers it lacks."""
    folder = tmp / "tiny-sd1"
    subprocess.run([sys.executable, "-m", "trainer", "tiny-model", "--arch", "sd1", "--single-file", str(folder)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    single = next(folder.glob("*.safetensors"))
    code = f"""
import torch
from safetensors.torch import save_file
from trainer.shrink.base_model import BaseModel
base = BaseModel({str(single)!r})
names = sorted(n for n in base._index if n.startswith("lora_unet_down_blocks") and n.endswith("attn1_to_q"))[:2]
g = torch.Generator().manual_seed(0)
def lora(prefix_names):
    out = {{}}
    for n in prefix_names:
        o, i = base.shape(n) if base.has(n) else (8, 8)
        out[n + ".lora_down.weight"] = torch.randn(2, i, generator=g)
        out[n + ".lora_up.weight"] = torch.randn(o, 2, generator=g)
        out[n + ".alpha"] = torch.tensor(1.0)
    return out
save_file(lora(names), {str(tmp / "good.safetensors")!r})
save_file(lora(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_not_here"]), {str(tmp / "bad.safetensors")!r})
print(json.dumps(names))
"""
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=REPO, check=True, capture_output=True,
                         text=True, timeout=300)
    assert len(json.loads(out.stdout)) == 2
    return single, tmp / "good.safetensors", tmp / "bad.safetensors"


def _succeeded_metadata(client, s3, bucket: str, job_id: str, kind: str, output: str) -> dict:
    """Waits for the job, checks it succeeded as `kind` with `output`, spec.json and metadata.json among
    its outputs, and returns its metadata.json."""
    job = wait_finished(client, job_id, timeout_s=300)
    logs = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}, headers=auth()).text
    assert job["phase"] == "succeeded" and job["kind"] == kind, (job, logs)
    names = {o["name"]: o for o in job["outputs"]}
    assert {output, "spec.json", "metadata.json"} <= set(names), names
    key = names["metadata.json"]["uri"].split(f"{bucket}/", 1)[1]
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_merge_job_succeeds_and_a_mismatched_adapter_fails_it(client_factory, bucket, s3, tmp_path):
    single, good, bad = _assets(tmp_path)
    for path, key in ((single, "models/tiny-merge/base.safetensors"), (good, "models/adapters/good.safetensors"),
                      (bad, "models/adapters/bad.safetensors"), (single, "models/adapters/ckpt.safetensors")):
        s3.upload_file(str(path), bucket, key)
    client = client_factory(trainer_command=None, heartbeat_timeout_s=120, max_running_jobs=2)

    def body(adapter: str, ratio: float) -> dict:
        return {"spec": {
            "version": 1, "kind": "merge", "name": f"merge-{adapter}",
            "model": {"uri": f"s3://{bucket}/models/tiny-merge/base.safetensors", "arch": "sd1"},
            "merge": {"adapters": [{"uri": f"s3://{bucket}/models/adapters/{adapter}.safetensors", "ratio": ratio}]},
            "save": {"output_name": "merged"},
            "resources": {"gpus": 0, "max_attempts": 1},
        }}

    r = client.post("/v1/jobs", json=body("good", 11.0), headers=auth())
    assert r.status_code == 422 and "merge.adapters[0].ratio" in r.text, r.text
    # What the adapter's header tells (two ranged GETs) is refused at submit: a checkpoint is no adapter,
    # an SDXL adapter does not go into an SD1 base, a missing object is named.
    s3.put_object(Bucket=bucket, Key="models/adapters/xl.safetensors", Body=_header_only({
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": {"dtype": "F32", "shape": [1, 1],
                                                                         "data_offsets": [0, 4]}}))
    for name, words in (("ckpt", "not an sd-scripts/LyCORIS adapter"), ("xl", "adapter for SDXL"),
                        ("absent", "no such object")):
        r = client.post("/v1/jobs", json=body(name, 1.0), headers=auth())
        assert r.status_code == 422 and words in r.text and "merge.adapters[0].uri" in r.text, r.text

    good_id = client.post("/v1/jobs", json=body("good", -0.5), headers=auth()).json()["id"]
    bad_id = client.post("/v1/jobs", json=body("bad", 1.0), headers=auth()).json()["id"]
    meta = _succeeded_metadata(client, s3, bucket, good_id, "merge", "merged.safetensors")
    assert meta["kind"] == "merge" and meta["merge"]["layers"] == 2 and meta["merge"]["changed_tensors"] == 2
    assert meta["merge"]["adapters"][0]["ratio"] == -0.5

    failed = wait_finished(client, bad_id, timeout_s=300)
    assert failed["phase"] == "failed" and failed["error"]["reason"] == "adapter_mismatch", failed
    assert "bad.safetensors" in failed["error"]["message"] and "not_here" in failed["error"]["message"]
    listed = {j["id"]: j for j in client.get("/v1/jobs", headers=auth()).json()["items"]}
    assert listed[good_id]["kind"] == "merge"


def test_lathe_merge_builds_the_merge_spec_from_uris_and_job_ids():
    from service.cli import build_parser
    from service.cli_submit import merge_spec, shrink_spec

    class Jobs:  # the two answers `lathe merge` reads: a finished job and a running one
        def get(self, job_id):
            if job_id == "j-done":
                return {"phase": "succeeded", "outputs": [
                    {"kind": "adapter_epoch", "uri": "s3://b/out/last-000001.safetensors"},
                    {"kind": "adapter", "uri": "s3://b/out/last.safetensors"}]}
            return {"phase": "training", "outputs": []}

    args = build_parser().parse_args(["merge", "s3://b/x.safetensors:0.5", "j-done:-1.25", "s3://b/y.safetensors",
                                      "--model", "s3://b/base.safetensors", "--arch", "sdxl", "--output-name", "m"])
    spec = merge_spec(args, Jobs())
    assert spec["kind"] == "merge" and spec["model"] == {"uri": "s3://b/base.safetensors", "arch": "sdxl"}
    assert spec["merge"]["adapters"] == [{"uri": "s3://b/x.safetensors", "ratio": 0.5},
                                         {"uri": "s3://b/out/last.safetensors", "ratio": -1.25},
                                         {"uri": "s3://b/y.safetensors", "ratio": 1.0}]
    assert spec["save"] == {"output_name": "m"}
    with pytest.raises(SystemExit, match="j-run is training"):
        merge_spec(build_parser().parse_args(["merge", "j-run", "--model", "s3://b/base"]), Jobs())
    args = build_parser().parse_args(["shrink", "j-done", "--model", "s3://b/base", "--rank", "8", "--no-plot"])
    assert shrink_spec(args, Jobs()) == {
        "version": 1, "kind": "shrink", "model": {"uri": "s3://b/base", "arch": "sd1"}, "resources": {"gpus": 1},
        "shrink": {"adapter": "s3://b/out/last.safetensors", "plot": False, "rank": 8}}


def test_shrink_job_reduces_an_adapter_and_refuses_a_checkpoint(client_factory, bucket, s3, tmp_path):
    single, good, _ = _assets(tmp_path)
    s3.upload_file(str(single), bucket, "models/tiny-shrink/base.safetensors")
    client = client_factory(trainer_command=None, heartbeat_timeout_s=120, max_running_jobs=1)
    # The adapter arrives as `lathe shrink FILE` sends it: POST /v1/uploads (kind adapter), then a presigned PUT.
    r = client.post("/v1/uploads", json={"dataset": "mine", "kind": "adapter", "files": [{"path": "a.txt"}]},
                    headers=auth())
    assert r.status_code == 400 and ".safetensors" in r.text
    r = client.post("/v1/uploads", json={"dataset": "mine", "kind": "adapter", "files": [{"path": "good.safetensors"}]},
                    headers=auth())
    assert r.status_code == 201, r.text
    (target,) = r.json()["files"]
    assert httpx.put(target["url"], content=good.read_bytes(), headers=target["headers"]).status_code == 200
    adapter_key = target["uri"].split(f"{bucket}/", 1)[1]
    assert "/adapters/mine/" in adapter_key

    def body(adapter_key: str) -> dict:
        return {"spec": {
            "version": 1, "kind": "shrink", "model": {"uri": f"s3://{bucket}/models/tiny-shrink/base.safetensors"},
            "shrink": {"adapter": f"s3://{bucket}/{adapter_key}", "rank": 1, "plot": False},
            "save": {"output_name": "small"}, "resources": {"gpus": 0, "max_attempts": 1},
        }}

    r = client.post("/v1/jobs", json=body("models/tiny-shrink/base.safetensors"), headers=auth())
    assert r.status_code == 422 and "shrink.adapter" in r.text and "not an sd-scripts/LyCORIS adapter" in r.text
    r = client.post("/v1/jobs", json=body(adapter_key), headers=auth())
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    meta = _succeeded_metadata(client, s3, bucket, job_id, "shrink", "small-shrunk.safetensors")
    report = meta["shrink_report"]
    assert report["input"] == target["uri"] and report["output"] == "small-shrunk.safetensors"
    assert {row["new_rank"] for row in report["layers"]} == {1} and str(tmp_path) not in json.dumps(meta)
