"""Pure pieces of the service: phase merge, URI prefixes, tokens, settings, ids, webhooks, headers."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from trainer.core.images import UnreadableImage, image_size
from service.cli_jobs import new_lines
from service.state.jobstore import AttemptRecord, JobRecord, index_name, is_job_id, job_id_of_index, new_job_id
from service.reconcile.phase import effective
from service.settings import Settings, SettingsError
from service.tenants import TenantRegistry, TokensFileError, hash_token, load_tokens_file, uri_under
from service.reconcile.webhooks import decode_secret, sign, verify
from trainer.core.status import ErrorInfo, JobStatus


def record(**kw) -> JobRecord:
    base = dict(job_id="j-20250101t000000-00000000", tenant="acme", submitted_at=1.0, spec_hash="h", max_attempts=3)
    base.update(kw)
    return JobRecord(**base)


def status(phase: str, attempt: int = 1, reason: str | None = None) -> JobStatus:
    return JobStatus(phase=phase, attempt=attempt, revision=5,
                     error=ErrorInfo(reason=reason, message="m") if reason else None)


@pytest.mark.parametrize("rec, st, phase", [
    (record(), None, "queued"),
    (record(state="launched", attempt=1), None, "queued"),  # launched, trainer not reporting yet
    (record(state="launched", attempt=2), status("training", attempt=1), "queued"),  # old attempt's status
    (record(state="launched", attempt=1), status("training"), "training"),
    (record(state="launched", attempt=1), status("succeeded"), "succeeded"),
    (record(state="launched", attempt=1), status("failed", reason="preempted"), "queued"),  # will retry
    (record(state="launched", attempt=3), status("failed", attempt=3, reason="preempted"), "failed"),  # none left
    (record(state="launched", attempt=1), status("failed", reason="nan_loss"), "failed"),  # not retryable
    (record(state="launched", attempt=1, cancel_requested_at=2.0), status("failed", reason="preempted"), "failed"),
    (record(state="finished", attempt=1, final_phase="cancelled"), status("training"), "cancelled"),
])
def test_effective_phase_merges_record_and_status(rec, st, phase):
    assert effective(rec, st).phase == phase


def test_a_job_waiting_for_its_retry_shows_why():
    failed = AttemptRecord(attempt=1, launched_at=1.0, ended_at=2.0, reason="preempted", message="node drained")
    waiting = effective(record(state="queued", attempt=1, attempts=[failed]), status("failed", reason="preempted"))
    assert waiting.phase == "queued" and waiting.error == ErrorInfo(reason="preempted", message="node drained")
    assert effective(record(), None).error is None  # never launched: nothing to explain


def test_uri_prefixes_are_folder_boundaries_and_refuse_dot_segments():
    assert uri_under("s3://bkt/acme/data/x", "s3://bkt/acme/")
    assert uri_under("s3://bkt/acme", "s3://bkt/acme/")
    assert not uri_under("s3://bkt/acme-evil/x", "s3://bkt/acme")
    assert not uri_under("s3://bkt/acme/../other/x", "s3://bkt/acme/")
    assert not uri_under("s3://bkt/acme//x", "s3://bkt/acme/")
    assert not uri_under("s3://other/acme/x", "s3://bkt/acme/")
    assert not uri_under("/data/acme/../../etc", "/data/acme/")
    assert not uri_under("data/acme/x", "data/acme/")  # relative: the trainer would resolve it elsewhere
    # a file:// URI and a plain path naming one folder are the same location
    assert uri_under("file:///data/acme/x%20y", "/data/acme/")
    assert uri_under("/data/acme/x", "file:///data/acme/")


def test_tokens_are_hashed_and_map_to_tenants(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(f'''
[[tenants]]
name = "acme"
token_sha256 = ["{hash_token('a-token')}", "{hash_token('rotated')}"]
dataset_prefixes = ["s3://data/acme/"]
[tenants.limits]
max_concurrent_jobs = 2
''')
    registry = TenantRegistry.from_file(str(path), "s3://state/")
    tenant = registry.authenticate("rotated")
    assert tenant is not None and tenant.name == "acme" and tenant.limits.max_concurrent_jobs == 2
    assert registry.authenticate("wrong") is None and registry.authenticate("") is None
    assert tenant.allows("dataset", "s3://state/tenants/acme/datasets/x/")  # its own area
    assert not tenant.allows("dataset", "s3://state/tenants/other/datasets/x/")
    assert not tenant.allows("model", "s3://data/acme/m")  # dataset prefixes are not model prefixes


def test_tokens_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"tenants": [{"name": "acme", "token_sha256": ["plaintext-token"]}]}))
    with pytest.raises(TokensFileError, match=r"t\.json.*token_sha256"):
        load_tokens_file(str(bad))
    with pytest.raises(TokensFileError, match="cannot read"):
        load_tokens_file(str(tmp_path / "missing.json"))


def test_settings_from_env_parses_types_and_names_bad_variables():
    s = Settings.from_env({"LATHE_STATE_URI": "s3://x/", "LATHE_MAX_RUNNING_JOBS": "3",
                           "LATHE_TRAINER_COMMAND": '["python", "t.py"]', "LATHE_WEBHOOK_PHASE_CHANGES": "yes",
                           "LATHE_LOCAL_CACHE_DIR": "/c", "LATHE_URL": "ignored (client setting)"})
    assert s.max_running_jobs == 3 and s.trainer_command == ["python", "t.py"] and s.webhook_phase_changes
    assert s.trainer_cache_dir == "/c"
    with pytest.raises(SettingsError, match="LATHE_STATE_URI"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match="LATHE_MAX_RUNNING_JOBS"):
        Settings.from_env({"LATHE_STATE_URI": "s3://x/", "LATHE_MAX_RUNNING_JOBS": "-1"})
    with pytest.raises(SettingsError, match="LATHE_LAUNCHER"):
        Settings.from_env({"LATHE_STATE_URI": "s3://x/", "LATHE_LAUNCHER": "slurm"})


def test_job_ids_are_dns_safe_and_index_sorts_newest_first():
    a, b = new_job_id(1_700_000_000), new_job_id(1_700_000_100)
    assert is_job_id(a) and a == a.lower() and len(a) <= 63 - 4  # room for "-a<n>" attempt suffixes
    names = sorted([index_name(1_700_000_000.0, a), index_name(1_700_000_100.0, b)])
    assert [job_id_of_index(n) for n in names] == [b, a]


def test_standard_webhooks_signature_roundtrip():
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    key = decode_secret(secret)
    body = b'{"type":"job.succeeded"}'
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": sign(key, "msg_1", now, body)}
    assert verify(key, headers, body)
    assert not verify(key, headers, body + b" ")
    assert not verify(key, {**headers, "webhook-timestamp": str(now - 3600)}, body)


def test_standard_webhooks_known_vector():
    # The example of the Standard Webhooks specification.
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_image_size_reads_headers_and_grows_for_late_size_markers():
    buf = io.BytesIO()
    Image.new("RGB", (123, 45)).save(buf, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 60_000)
    data = buf.getvalue()
    reads = []

    def read(n: int) -> bytes:
        reads.append(n)
        return data[:n]

    assert image_size(read, len(data), first_bytes=4096) == (123, 45)
    assert len(reads) >= 2 and reads[-1] < len(data) + 1
    with pytest.raises(UnreadableImage):
        image_size(lambda n: b"\x89PNG\r\n\x1a\nnot really"[:n], 18)


def test_log_follow_prints_only_new_lines():
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines([], ["a"]) == ["a"]
    assert new_lines(["x"], ["y", "z"]) == ["y", "z"]
