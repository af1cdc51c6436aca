"""deploy/: example job specs, the GPU-pool example objects, and the Kueue queues (CRD kinds, checked
here for consistency with the chart values and with the Jobs the launcher builds)."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s_helpers import KUBE_VERSIONS, REPO, SPEC_URI
from kubernetes.client import ApiClient
from kubernetes.utils import parse_quantity

from service.launchers.k8s import manifests
from service.launchers.k8s.settings import KubernetesSettings, Toleration
from service.launchers.base import LaunchRequest
from trainer.core.spec import JobSpec, decode_spec

DEPLOY = REPO / "deploy"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.json"))
SERIALIZE = ApiClient().sanitize_for_serialization


def read_spec(path: Path) -> JobSpec:
    return decode_spec(path.read_bytes(), format="json")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "values-gpu-pool.yaml").read_text())


def _settings_from_values() -> KubernetesSettings:
    """The settings the chart derives from the example values (the chart's own test checks the mapping)."""
    t = _values()["trainer"]
    return KubernetesSettings(
        namespace="lathe",
        trainer_image=f"{t['image']['repository']}:{t['image']['tag']}",
        image_pull_secrets=tuple(t["imagePullSecrets"]),
        node_selector=t["nodeSelector"],
        tolerations=tuple(Toleration(**x) for x in t["tolerations"]),
        priority_class=t["priorityClassName"],
        model_cache=t["modelCache"]["hostPath"],
        kueue_queue=t["kueueQueue"],
        s3_secret_name=_values()["secrets"]["s3"],
        scratch_size=t["scratchSize"],
        default_cpu=t["defaultCpu"],
        default_memory=t["defaultMemory"],
    )


def _jobs_for_examples() -> list[tuple[str, dict[str, Any]]]:
    settings = _settings_from_values()
    jobs = []
    for path in EXAMPLES:
        request = LaunchRequest(job_id="j-20261123t101500-ab12cd34", tenant="acme", attempt=1, spec_uri=SPEC_URI,
                                spec=read_spec(path))
        jobs.append((path.name, SERIALIZE(manifests.build_job(request, settings))))
    return jobs


def test_example_specs_cover_the_three_shapes() -> None:
    shapes = {(s.resources.gpus, s.resources.nodes) for s in map(read_spec, EXAMPLES)}
    assert shapes == {(1, 1), (8, 1), (8, 4)}


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_spec_jobs_validate(name: str) -> None:
    spec = read_spec(DEPLOY / "examples" / name)
    request = LaunchRequest(job_id="j-20261123t101500-ab12cd34", tenant="acme", attempt=2, spec_uri=SPEC_URI, spec=spec)
    for obj in manifests.build_manifests(request, _settings_from_values()):
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(SERIALIZE(obj), version, strict=True)


@pytest.mark.parametrize("file", ["priority-class.yaml", "model-cache-prep.yaml"])
def test_plain_objects_validate(file: str) -> None:
    for obj in _docs(DEPLOY / file):
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_priority_class_and_model_cache_match_the_values() -> None:
    values = _values()["trainer"]
    (priority,) = _docs(DEPLOY / "priority-class.yaml")
    assert priority["metadata"]["name"] == values["priorityClassName"]
    (daemonset,) = _docs(DEPLOY / "model-cache-prep.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["volumes"][0]["hostPath"]["path"] == values["modelCache"]["hostPath"]
    assert pod["nodeSelector"] == values["nodeSelector"] and pod["tolerations"] == values["tolerations"]
    gid = KubernetesSettings().fs_group
    assert f"chown {gid}:{gid} /host-cache" in pod["initContainers"][0]["command"][-1]


def test_kueue_queues_admit_every_example_job() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in _docs(DEPLOY / "kueue.yaml")}
    assert {o["apiVersion"] for o in objects.values()} == {"kueue.x-k8s.io/v1beta1"}
    values = _values()["trainer"]
    local = objects[("LocalQueue", values["kueueQueue"])]
    assert local["metadata"]["namespace"] == "lathe"
    cluster = objects[("ClusterQueue", local["spec"]["clusterQueue"])]
    assert cluster["spec"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "lathe"}
    (group,) = cluster["spec"]["resourceGroups"]
    quota: dict[str, Decimal] = defaultdict(Decimal)
    for flavor in group["flavors"]:
        resource_flavor = objects[("ResourceFlavor", flavor["name"])]
        # The flavor places pods exactly where the chart's node selector and tolerations do.
        assert resource_flavor["spec"]["nodeLabels"] == values["nodeSelector"]
        assert resource_flavor["spec"]["tolerations"] == values["tolerations"]
        assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
        for r in flavor["resources"]:
            quota[r["name"]] += parse_quantity(r["nominalQuota"])
    for name, job in _jobs_for_examples():
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == local["metadata"]["name"]
        assert job["spec"]["suspend"] is True
        requests = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        # Kueue never admits a Job that requests a resource its ClusterQueue does not cover...
        assert set(requests) <= set(group["coveredResources"]), name
        # ...nor one whose pods together exceed the quota.
        for resource, amount in requests.items():
            total = parse_quantity(amount) * job["spec"]["parallelism"]
            assert total <= quota[resource], f"{name}: {resource} {total} > quota {quota[resource]}"
