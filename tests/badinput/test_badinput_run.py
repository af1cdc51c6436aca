"""One bad input end to end with the REAL trainer (`python -m trainer run`, started by the LocalLauncher):
a .tar.gz dataset whose member climbs out with '..'. The preflight cannot look inside a compressed
tarball, so the job is accepted; the trainer refuses the archive before extracting anything and exits
with dataset_invalid, which the API reports naming the archive and the member, after one attempt (a
final reason is not retried). The trainer fails in its prepare phase, before torch is imported, so
this costs seconds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.badinput.badinput_helpers import LEAK_MARKERS, auth, good_members, image, spec, tar_bytes
from tests.common_helpers import wait_for


def test_the_trainer_refuses_a_hostile_tarball_naming_the_member(bi_s3, bi_bucket, bi_tokens_file, tmp_path):
    from litestar.testing import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    key = "datasets/run/evil.tar.gz"
    bi_s3.put_object(Bucket=bi_bucket, Key=key,
                     Body=tar_bytes([*good_members(), ("../../../../home/evil.png", image())], mode="w:gz"))
    settings = Settings(state_uri=f"s3://{bi_bucket}/state-run/", tokens_file=str(bi_tokens_file), launcher="local",
                        local_dir=str(tmp_path / "local"), trainer_cache_dir=str(tmp_path / "cache"),
                        trainer_command=[sys.executable, "-m", "trainer", "run"], reconcile_interval_s=0.2,
                        heartbeat_timeout_s=60, retry_backoff_s=0.1)
    app = create_app(settings, events_poll_s=0.1)
    with TestClient(app, raise_server_exceptions=False) as api:
        body = {"spec": spec(bi_bucket, **{"dataset.uri": f"s3://{bi_bucket}/{key}", "resources.max_attempts": 3})}
        r = api.post("/v1/jobs", json=body, headers=auth())
        assert r.status_code == 201, r.text
        assert any("not inspected" in w for w in r.json()["warnings"]), r.json()  # the preflight said so
        job_id = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            job = api.get(f"/v1/jobs/{job_id}", headers=auth()).json()
            return job if job.get("finished_at") else None

        job = wait_for(finished, 120, 0.2, "the job to finish")
        logs = api.get(f"/v1/jobs/{job_id}/logs", headers=auth()).text
        assert job["phase"] == "failed", (job, logs)
        assert job["error"]["reason"] == "dataset_invalid", job
        message = job["error"]["message"]
        assert f"s3://{bi_bucket}/{key}" in message and "'../../../../home/evil.png' climbs out" in message, message
        assert [a["reason"] for a in job["attempts"]] == ["dataset_invalid"], job["attempts"]  # not retried
        for text in (r.text, str(job), logs):
            for marker in LEAK_MARKERS:
                assert marker not in text, (marker, text[-3000:])
        launcher = app.state.services.extra["launcher"]
    launcher.shutdown(kill=True, timeout_s=5)
    # Nothing of the archive landed anywhere: not in the work folder, not beside it.
    assert not [p for p in Path(tmp_path).rglob("evil.png")]
