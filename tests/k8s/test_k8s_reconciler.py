"""The reconciler driving the Kubernetes launcher on the stand-in cluster: one trainer per job at a time.

The trainer processes are simulated as the real one behaves towards the service: on SIGTERM it writes
status.json `failed`/`preempted` for its attempt (checkpoint saved) and exits 20. The job store is a
local folder; the launcher reads status.json from it as in production.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fake_apiserver import FakeApiServer
from k8s_helpers import JOB_ID, full_settings, gpu_node, make_request
from kubelet import Kubelet
from kubernetes import client as k8s

from service.state.jobstore import JobRecord, JobStore
from trainer.core.jobkeys import STATUS_KEY
from service.launchers.k8s.launcher import KubernetesLauncher
from service.reconcile.reconciler import Reconciler
from service.settings import Settings
from service.tenants import TenantConfig, TenantRegistry
from trainer.core.spec import encode_spec
from trainer.core.status import ErrorInfo, JobStatus
from trainer.core.storage import open_store


@dataclass
class Trainer:
    """A trainer process: runs until signalled; on SIGTERM reports `preempted` and exits 20."""

    store: JobStore
    attempt: int
    code: int | None = None
    oom_killed: bool = False
    signals: list[int] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.code

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.code is not None:
            return
        if signum == signal.SIGTERM:
            now = time.time()
            status = JobStatus(phase="failed", attempt=self.attempt, heartbeat_at=now, updated_at=now,
                               error=ErrorInfo(reason="preempted", message="SIGTERM; checkpoint saved"))
            self.store.job_dir("acme", JOB_ID).put_bytes(STATUS_KEY, msgspec.json.encode(status))
            self.code = 20
        else:
            self.code = 137

    def logs(self) -> str:
        return f"attempt {self.attempt}\n"


class TrainerRuntime:
    """The pluggable runtime of the kubelet, here starting `Trainer`s that write to the job store."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.started: list[Trainer] = []

    def pull(self, image: str) -> None:
        if image.endswith(":missing"):
            from kubelet import ImagePullError

            raise ImagePullError("InvalidImageName", f'Failed to apply default image tag "{image}"')

    def start(self, pod: dict[str, Any], container: dict[str, Any], argv: list[str], env: dict[str, str]) -> Trainer:
        trainer = Trainer(self.store, int(env["LATHE_JOB_ATTEMPT"]))
        self.started.append(trainer)
        return trainer

    def running(self) -> list[int]:
        return sorted(t.attempt for t in self.started if t.code is None)


class Service:
    def __init__(self, tmp_path: Path, api: FakeApiServer, **settings: Any) -> None:
        root = str(tmp_path / "state")
        self.store = JobStore(open_store(root))
        self.api = api
        self.clock = [time.time()]
        tenants = TenantRegistry([TenantConfig(name="acme", token_sha256=["a" * 64])], root)
        self.launcher = KubernetesLauncher(
            full_settings(**settings), k8s.ApiClient(k8s.Configuration(host=api.url)), sleep=lambda s: None,
            request_timeout_s=10, now=api.now,
            status_reader=lambda tenant, job_id: self.store.read_status(tenant, job_id))
        self.reconciler = Reconciler(Settings(state_uri=root, reconcile_interval_s=0, retry_backoff_s=0),
                                     self.store, tenants, self.launcher, clock=lambda: self.clock[0])

    def submit(self, resources: dict[str, Any], max_attempts: int = 3) -> None:
        spec = make_request(resources).spec
        record = JobRecord(job_id=JOB_ID, tenant="acme", submitted_at=self.clock[0], spec_hash="x",
                           max_attempts=max_attempts)
        record.slot = self.store.claim_slot("acme", JOB_ID, 4)
        assert self.store.create_job(record, encode_spec(spec))

    def record(self) -> JobRecord:
        return self.store.read_record("acme", JOB_ID)

    def rounds(self, node: Kubelet, runtime: TrainerRuntime, n: int = 8, advance_s: float = 0) -> list[list[int]]:
        """Reconciler, Job controller and kubelet passes; the attempts whose trainers run after each."""
        seen = []
        for _ in range(n):
            self.reconciler.tick()
            node.run_until_settled(1)
            self.api.advance(advance_s)
            self.clock[0] += advance_s
            seen.append(runtime.running())
        return seen


def _attempt_jobs(api: FakeApiServer) -> list[str]:
    return [name.rsplit("-", 1)[1] for name in api.names("jobs", "lathe")]


def test_preempted_single_node_attempt_is_replaced_by_the_service_alone(tmp_path: Path, api: FakeApiServer) -> None:
    service = Service(tmp_path, api)
    service.submit({"gpus": 1})
    runtime = TrainerRuntime(service.store)
    node = gpu_node(api, runtime)
    assert service.rounds(node, runtime, 3)[-1] == [1]
    (pod,) = api.pods_of("lathe", f"{JOB_ID}-a1")
    api.preempt("lathe", pod["metadata"]["name"])  # the scheduler makes room for a higher priority pod
    seen = service.rounds(node, runtime, 8)
    assert all(len(running) <= 1 for running in seen), seen  # never two trainers on one job folder
    assert seen[-1] == [2] and _attempt_jobs(api) == ["a2"]  # attempt 1's Job is gone
    assert [t.attempt for t in runtime.started] == [1, 2]  # the Job did not replace attempt 1's pod


def test_kueue_preemption_deletes_the_attempt_before_the_next(tmp_path: Path, api: FakeApiServer) -> None:
    service = Service(tmp_path, api, kueue_queue="lathe-gpu")
    service.submit({"gpus": 1})
    runtime = TrainerRuntime(service.store)
    node = gpu_node(api, runtime)
    service.reconciler.tick()
    api.admit("lathe", f"{JOB_ID}-a1", node_selector={"cloud.example.com/flavor": "a100"})
    node.labels["cloud.example.com/flavor"] = "a100"
    assert service.rounds(node, runtime, 3)[-1] == [1]
    api.kueue_preempt("lathe", f"{JOB_ID}-a1")  # suspended: its pod gets SIGTERM
    seen = []
    for _ in range(8):
        seen += service.rounds(node, runtime, 1)
        for name in api.names("jobs", "lathe"):
            if api.get("jobs", "lathe", name)["spec"]["suspend"]:
                api.admit("lathe", name)  # Kueue requeues the workload and admits whatever is still there
    assert all(len(running) <= 1 for running in seen), seen
    assert seen[-1] == [2] and _attempt_jobs(api) == ["a2"]


@pytest.mark.parametrize("image", ["registry.example.com/lathe/trainer:missing"])
def test_a_pod_that_cannot_start_is_deleted_with_its_job(tmp_path: Path, api: FakeApiServer, image: str) -> None:
    service = Service(tmp_path, api, trainer_image=image)
    service.submit({"gpus": 1})
    runtime = TrainerRuntime(service.store)
    node = gpu_node(api, runtime)
    service.rounds(node, runtime, 4)
    record = service.record()
    assert record.final_phase == "failed" and record.error.reason == "image_pull_error"
    assert api.names("jobs", "lathe") == api.names("pods", "lathe") == []  # GPU and quota freed


def test_runtime_limit_counts_from_the_start_not_the_queue(tmp_path: Path, api: FakeApiServer) -> None:
    service = Service(tmp_path, api, kueue_queue="lathe-gpu")
    service.submit({"gpus": 1, "max_runtime_s": 600})
    runtime = TrainerRuntime(service.store)
    node = gpu_node(api, runtime)
    service.rounds(node, runtime, 3, advance_s=3600)  # three hours queued in Kueue
    assert service.record().final_phase is None
    api.admit("lathe", f"{JOB_ID}-a1")
    service.rounds(node, runtime, 3, advance_s=100)
    assert service.record().final_phase is None and runtime.running() == [1]
    service.rounds(node, runtime, 6, advance_s=100)
    record = service.record()
    # The trainer answered the deadline's SIGTERM with `preempted`; the Job's reason wins.
    assert record.final_phase == "failed" and record.error.reason == "deadline_exceeded", record
    assert record.attempt == 1 and runtime.running() == []
