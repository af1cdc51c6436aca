"""KubernetesLauncher: the Launcher protocol on batch/v1 Jobs, through the official `kubernetes` client.

Every API call goes through `_call`: it names the action and `namespace/name`, retries a bounded
number of times on 500/503/504 only (a retried create that had in fact succeeded comes back as 409,
which submit treats as "already there"), and turns anything else into `KubernetesApiError`.
Clock and sleeper are arguments, so tests are deterministic.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from service.launchers.k8s import manifests, states
from service.launchers.k8s.settings import KubernetesSettings
from service.launchers.base import AttemptState, LaunchRequest

RETRYABLE_STATUS = frozenset({500, 503, 504})
T = TypeVar("T")
StatusReader = Callable[[str, str], Mapping[str, Any] | None]  # (tenant, job_id) → status.json or None


class KubernetesApiError(RuntimeError):
    """A Kubernetes API call that failed for good; `status` is the HTTP status (None: no answer)."""

    def __init__(self, action: str, status: int | None, message: str) -> None:
        hint = _HINTS.get(status or 0, "")
        super().__init__(f"{action}: {status or 'no response'} {message}{hint}")
        self.action = action
        self.status = status
        self.detail = message  # the API server's own message


_HINTS = {
    401: " (the service's credentials for the cluster were refused)",
    403: " (the service account lacks RBAC for this: see the Role in helm/lathe)",
    422: " (the API server rejected the object; this is a bug in the manifest builders)",
}


def load_api_client() -> k8s.ApiClient:
    """In-cluster configuration when running in a pod, the kubeconfig otherwise."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


class KubernetesLauncher:
    """Runs each attempt as a Job (and, for nodes > 1, a headless Service) in `settings.namespace`."""

    def __init__(
        self,
        settings: KubernetesSettings,
        api_client: k8s.ApiClient | None = None,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
        request_timeout_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
        status_reader: StatusReader | None = None,
    ) -> None:
        api_client = api_client or load_api_client()
        self.settings = settings
        self._batch = k8s.BatchV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout = request_timeout_s
        self._sleep = sleep
        self._now = now
        self._status_reader = status_reader

    # -- Launcher protocol ---------------------------------------------------------------------

    def submit(self, request: LaunchRequest) -> None:
        ns = self.settings.namespace
        job = manifests.build_job(request, self.settings)
        name = job.metadata.name
        try:
            created = self._call(f"create Job {ns}/{name}", self._batch.create_namespaced_job, ns, job)
        except KubernetesApiError as exc:
            if exc.status != 409:
                raise
            created = self._call(f"read Job {ns}/{name}", self._batch.read_namespaced_job, name, ns)
            if not _same_attempt(created, request.tenant, request.job_id, request.attempt):
                raise KubernetesApiError(
                    f"create Job {ns}/{name}", 409,
                    "a Job of that name exists but belongs to another job or tenant; it was left alone",
                ) from exc
        if request.spec.resources.nodes > 1:
            service = manifests.build_headless_service(request, self.settings, manifests.owner_reference(created))
            try:
                self._call(f"create Service {ns}/{name}", self._core.create_namespaced_service, ns, service)
            except KubernetesApiError as exc:
                if exc.status != 409:
                    # Without its Service the ranks cannot meet: the Job must not stay behind, running
                    # pods (and holding GPUs) that no one watches.
                    self.cancel(request.tenant, request.job_id, request.attempt)
                    raise

    def cancel(self, tenant: str, job_id: str, attempt: int) -> None:
        """Delete the Job and its pods. Deleting a pod sends SIGTERM, on which the trainer saves a
        checkpoint within terminationGracePeriodSeconds; Foreground keeps the Job visible until its
        pods are gone, so `state` does not report GONE while a trainer is still writing."""
        ns = self.settings.namespace
        name = manifests.attempt_name(job_id, attempt)
        job = self._read_job(name)
        if job is None:
            return
        if not _same_attempt(job, tenant, job_id, attempt):
            raise KubernetesApiError(f"delete Job {ns}/{name}", 403, "the Job belongs to another tenant or job")
        options = k8s.V1DeleteOptions(propagation_policy="Foreground")
        for kind, delete in (("Job", self._batch.delete_namespaced_job), ("Service", self._core.delete_namespaced_service)):
            try:
                self._call(f"delete {kind} {ns}/{name}", delete, name, ns, body=options)
            except KubernetesApiError as exc:
                if exc.status != 404:
                    raise

    def state(self, tenant: str, job_id: str, attempt: int) -> AttemptState:
        job = self._read_job(manifests.attempt_name(job_id, attempt))
        if job is not None and not _same_attempt(job, tenant, job_id, attempt):
            job = None  # another tenant's object is never shown
        pods = self._list_pods(tenant, job_id, attempt) if job is not None else []
        view = states.attempt_state(job, pods, now=self._now(), image_pull_timeout_s=self.settings.image_pull_timeout_s,
                                    start_timeout_s=self.settings.start_timeout_s)
        if self._status_reader is not None:
            view = states.merge_status(view, self._status_reader(tenant, job_id), attempt)
        return view

    def logs(self, tenant: str, job_id: str, attempt: int, tail_lines: int = 200) -> str:
        """The last `tail_lines` of each pod's trainer container (newest pod per rank)."""
        ns = self.settings.namespace
        pods = states.latest_pods(self._list_pods(tenant, job_id, attempt))
        parts = []
        for pod in pods:
            name = pod.metadata.name
            try:
                text = self._call(
                    f"read log of Pod {ns}/{name}", self._core.read_namespaced_pod_log, name, ns,
                    container=manifests.CONTAINER, tail_lines=tail_lines,
                )
            except KubernetesApiError as exc:
                if exc.status == 404:
                    continue
                if exc.status != 400:  # 400: the container has not started yet
                    raise
                text = f"[no log yet: {exc.detail}]\n"
            if len(pods) > 1:
                index = (pod.metadata.annotations or {}).get(manifests.ANNOTATION_COMPLETION_INDEX, "?")
                text = f"==> pod {name} (rank {index}) <==\n{text}"
            parts.append(text if text.endswith("\n") or not text else text + "\n")
        return "".join(parts)

    # -- helpers -------------------------------------------------------------------------------

    def _read_job(self, name: str) -> k8s.V1Job | None:
        ns = self.settings.namespace
        try:
            return self._call(f"read Job {ns}/{name}", self._batch.read_namespaced_job, name, ns)
        except KubernetesApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _list_pods(self, tenant: str, job_id: str, attempt: int) -> list[k8s.V1Pod]:
        ns = self.settings.namespace
        selector = manifests.attempt_selector(tenant, job_id, attempt)
        result = self._call(f"list Pods in {ns} ({selector})", self._core.list_namespaced_pod, ns, label_selector=selector)
        return list(result.items or [])

    def _call(self, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self._retries + 1):
            try:
                return fn(*args, _request_timeout=self._timeout, **kwargs)
            except ApiException as exc:
                if exc.status in RETRYABLE_STATUS and attempt < self._retries:
                    self._sleep(self._backoff_s * 2**attempt)
                    continue
                raise KubernetesApiError(action, exc.status, _api_message(exc)) from exc
            except urllib3.exceptions.HTTPError as exc:  # connection refused, timeout (urllib3 retried already)
                raise KubernetesApiError(action, None, f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")


def _same_attempt(job: k8s.V1Job, tenant: str, job_id: str, attempt: int) -> bool:
    labels = job.metadata.labels or {}
    expected = manifests.attempt_labels(tenant, job_id, attempt)
    return all(labels.get(k) == expected[k] for k in (manifests.LABEL_TENANT, manifests.LABEL_JOB, manifests.LABEL_ATTEMPT))


def _api_message(exc: ApiException) -> str:
    """The API server's Status message when there is one, else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(exc.reason or "").strip() or "error"
