"""A queued job whose stored spec.json does not pass the spec check fails with spec_invalid; the
reconciler's pass goes on and launches the jobs queued after it."""

from __future__ import annotations

from service.reconcile.reconciler import Reconciler
from tests.service.conftest import RunningLauncher, auth, spec


def test_a_stored_spec_that_no_longer_decodes_fails_its_job_only(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    services = client.app.state.services
    ids = []
    for _ in range(2):
        r = client.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth())
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    services.store.job_dir("acme", ids[0]).put_bytes("spec.json", b'{"version": 1, "kind": "grid"}')
    launcher = RunningLauncher()
    Reconciler(services.settings, services.store, services.tenants, launcher=launcher).tick()
    bad = services.store.read_record("acme", ids[0])
    assert bad.final_phase == "failed" and bad.error.reason == "spec_invalid" and "spec.json" in bad.error.message
    assert [job_id for job_id, _ in launcher.launched] == [ids[1]]
