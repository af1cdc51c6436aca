"""The stand-in API server behaves as kube-apiserver does for what the launcher relies on.

Checked with the official client's plain API calls (no launcher), so a launcher test cannot pass
because the stand-in is lenient where the real server is not.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from fake_apiserver import FakeApiServer, parse_selector
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException


def _job(name: str, *, gpu_request: str = "1", gpu_limit: str = "1", restart: str = "Never") -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [
                {"type": "DisruptionTarget", "status": "True"}]}]},
            "template": {"spec": {"restartPolicy": restart, "containers": [{
                "name": "c", "image": "busybox",
                "resources": {"requests": {"nvidia.com/gpu": gpu_request}, "limits": {"nvidia.com/gpu": gpu_limit}},
            }]}},
        },
    }


@pytest.fixture
def batch(api: FakeApiServer) -> k8s.BatchV1Api:
    return k8s.BatchV1Api(k8s.ApiClient(k8s.Configuration(host=api.url)))


def test_create_defaults_conflict_and_not_found(api: FakeApiServer, batch: k8s.BatchV1Api) -> None:
    created = batch.create_namespaced_job("lathe", _job("a"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert (created.spec.backoff_limit, created.spec.completions, created.spec.completion_mode) == (6, 1, "NonIndexed")
    assert created.spec.template.metadata.labels["batch.kubernetes.io/job-name"] == "a"
    with pytest.raises(ApiException) as conflict:
        batch.create_namespaced_job("lathe", _job("a"))
    assert conflict.value.status == 409 and '"AlreadyExists"' in conflict.value.body
    with pytest.raises(ApiException) as missing:
        batch.read_namespaced_job("b", "lathe")
    assert missing.value.status == 404 and 'jobs.batch \\"b\\" not found' in missing.value.body


@pytest.mark.parametrize(("job", "fragment"), [
    (_job("x", gpu_request="1", gpu_limit="2"), "overcommit is not allowed for extended resources"),
    (_job("x", restart="Always"), "restartPolicy: Unsupported value"),
    (_job("x" * 64), "must be no more than 63 characters"),
])
def test_invalid_objects_are_422(batch: k8s.BatchV1Api, job: dict, fragment: str) -> None:
    with pytest.raises(ApiException) as info:
        batch.create_namespaced_job("lathe", job)
    assert info.value.status == 422 and fragment in info.value.body


@pytest.mark.parametrize(("query", "code", "warning"), [
    ("", 201, '299 - "unknown field \\"spec.bogus\\""'),  # Warn, the server's default
    ("?fieldValidation=Ignore", 201, None),
    ("?fieldValidation=Strict", 400, None),
])
def test_unknown_fields_follow_field_validation(api: FakeApiServer, query: str, code: int, warning: str | None) -> None:
    # The client refuses unknown fields itself, so send the JSON as any other client could.
    body = {**_job(f"x{code}{len(query)}"), "spec": {**_job("x")["spec"], "bogus": 1}}
    request = urllib.request.Request(f"{api.url}/apis/batch/v1/namespaces/lathe/jobs{query}", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as exc:
        response = exc
    payload = json.loads(response.read())
    assert response.status == code
    if code == 400:
        assert payload["message"] == 'strict decoding error: unknown field "spec.bogus"'
        return
    assert "bogus" not in payload["spec"]  # dropped, as decoding into the Go types does
    assert response.headers.get("Warning") == warning


def test_jobs_orphan_their_pods_unless_told_otherwise(api: FakeApiServer, batch: k8s.BatchV1Api) -> None:
    # batch/v1 keeps the old default: deleting a Job without a policy leaves its pods running.
    batch.create_namespaced_job("lathe", _job("a"))
    api.sync_jobs()
    batch.delete_namespaced_job("a", "lathe")
    (pod,) = api.pods_of("lathe", "a")
    assert pod["metadata"]["ownerReferences"] == [] and "deletionTimestamp" not in pod["metadata"]


def test_label_selectors() -> None:
    labels = {"app": "lathe", "tier": "gpu"}
    for selector, expected in [("app=lathe", True), ("app==lathe,tier!=cpu", True), ("app", True), ("!app", False),
                               ("tier in (gpu, tpu)", True), ("tier notin (gpu)", False), ("app=other", False),
                               ("", True)]:
        assert parse_selector(selector)(labels) is expected, selector


# -- the Job controller model (controllers.py) on Jobs the launcher does not build -----------------


def _plain_job(name: str, **spec: object) -> dict:
    job = _job(name)
    del job["spec"]["podFailurePolicy"]
    job["spec"].update(spec)
    return job


def test_failed_pods_are_replaced_after_the_backoff_until_the_limit(api: FakeApiServer, batch: k8s.BatchV1Api) -> None:
    from kubelet import Kubelet, Script, SimulatedRuntime

    batch.create_namespaced_job("lathe", _plain_job("retry", backoffLimit=2))
    assert api.get("jobs", "lathe", "retry")["spec"]["podReplacementPolicy"] == "TerminatingOrFailed"
    node = Kubelet(api, SimulatedRuntime(Script(exit_code=1)))
    node.run_until_settled(5)
    assert len(node.runtime.started) == 1 and api.get("jobs", "lathe", "retry")["status"]["failed"] == 1
    api.advance(10)  # the pod-failure back-off: 10 s, then 20 s
    node.run_until_settled(5)
    assert len(node.runtime.started) == 2
    api.advance(19)
    node.run_until_settled(5)
    assert len(node.runtime.started) == 2  # still backing off
    api.advance(1)
    node.run_until_settled(5)
    job = api.get("jobs", "lathe", "retry")
    assert len(node.runtime.started) == 3 and job["status"]["failed"] == 3  # failed > backoffLimit
    assert [(c["type"], c["reason"]) for c in job["status"]["conditions"]] == [
        ("FailureTarget", "BackoffLimitExceeded"), ("Failed", "BackoffLimitExceeded")]


def test_terminating_pods_count_as_failed_only_without_a_failure_policy(api: FakeApiServer,
                                                                         batch: k8s.BatchV1Api) -> None:
    from kubelet import Kubelet, Script, SimulatedRuntime

    batch.create_namespaced_job("lathe", _plain_job("plain", backoffLimit=5))
    batch.create_namespaced_job("lathe", _job("policy"))  # podFailurePolicy ⇒ podReplacementPolicy Failed
    node = Kubelet(api, SimulatedRuntime(Script(steps=None, on_sigterm=None)))
    node.run_until_settled(2)
    for name in ("plain", "policy"):
        (pod,) = api.pods_of("lathe", name)
        api.evict("lathe", pod["metadata"]["name"])
    node.run_until_settled(2)
    assert api.get("jobs", "lathe", "plain")["status"]["failed"] == 1  # counted while still terminating
    assert api.get("jobs", "lathe", "policy")["status"]["terminating"] == 1
    api.advance(10)  # the back-off of that failure
    node.run_until_settled(2)
    plain, policy = api.pods_of("lathe", "plain"), api.pods_of("lathe", "policy")
    assert len(plain) == 2  # replaced while the old pod still terminates
    assert len(policy) == 1 and api.get("jobs", "lathe", "policy")["status"]["failed"] == 0  # waits for it
    api.advance(21)  # the grace period ends: SIGKILL, then the replacement (the Ignore rule: not counted)
    node.run_until_settled(3)
    policy = api.pods_of("lathe", "policy")
    assert len(policy) == 1 and policy[0]["status"]["phase"] == "Running"
    assert api.get("jobs", "lathe", "policy")["status"]["failed"] == 0


def test_indexed_replacement_keeps_the_index_fields(api: FakeApiServer, batch: k8s.BatchV1Api) -> None:
    from kubelet import Kubelet, Script, SimulatedRuntime, container_env

    batch.create_namespaced_job("lathe", _plain_job("idx", completions=2, parallelism=2, completionMode="Indexed",
                                                    backoffLimit=3))
    node = Kubelet(api, SimulatedRuntime(Script(steps=None), scripts={1: Script(exit_code=1)}))
    node.run_until_settled(5)
    api.advance(10)
    node.run_until_settled(2)
    rank1 = [p for p in api.pods_of("lathe", "idx") if p["metadata"]["labels"].get(
        "batch.kubernetes.io/job-completion-index") == "1"]
    assert len(rank1) == 2 and {p["spec"]["hostname"] for p in rank1} == {"idx-1"}
    assert all(container_env(p, "c")["JOB_COMPLETION_INDEX"] == "1" for p in rank1)
    assert all(p["metadata"]["name"].startswith("idx-1-") for p in rank1)
