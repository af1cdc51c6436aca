"""A queued job whose stored spec.json does not pass the spec check fails with spec_invalid; the
reconciler's pass goes on and launches the jobs queued after it."""

from __future__ import annotations

from service.reconcile.reconciler import Reconciler
from tests.service.conftest import auth, spec


class _Launcher:
    def __init__(self) -> None:
        self.launched: list[str] = []

    def submit(self, request) -> None:
        self.launched.append(request.job_id)

    def state(self, tenant, job_id, attempt):
        from service.launchers.base import AttemptState, RunState

        return AttemptState(state=RunState.RUNNING)

    def cancel(self, tenant, job_id, attempt) -> None:
        pass

    def logs(self, tenant, job_id, attempt, tail_lines=200) -> str:
        return ""


def test_a_stored_spec_that_no_longer_decodes_fails_its_job_only(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    services = client.app.state.services
    ids = []
    for _ in range(2):
        r = client.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth())
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    services.store.job_dir("acme", ids[0]).put_bytes("spec.json", b'{"version": 1, "kind": "grid"}')
    launcher = _Launcher()
    Reconciler(services.settings, services.store, services.tenants, launcher=launcher).tick()
    bad = services.store.read_record("acme", ids[0])
    assert bad.final_phase == "failed" and bad.error.reason == "spec_invalid" and "spec.json" in bad.error.message
    assert launcher.launched == [ids[1]]
