"""A local HTTP stand-in for kube-apiserver, for the calls the KubernetesLauncher makes.

It is NOT a Kubernetes API server and does not pretend to be one beyond this list. What it does, on
127.0.0.1, with the real wire format (JSON objects, `Status` bodies with reason/code):
- batch/v1 Jobs: create, get, list, delete; core/v1 Pods: get, list, delete, `log`; core/v1 Services:
  create, get, list, delete — namespaced paths only.
- Create: 201 with uid, resourceVersion, creationTimestamp and the defaults the real server adds to a
  Job (completions/parallelism 1, backoffLimit 6, completionMode, suspend, the controller-uid selector
  and template labels); 409 AlreadyExists; 404 for an unknown namespace; 400 when the body's namespace
  differs from the path's; 422 Invalid when the object fails the official JSON schema of
  `kube_version` or one of the Job/Service rules of the real validation that the launcher depends on
  (listed in `_semantic_errors`). Unknown fields follow `?fieldValidation=` as the real server does
  (1.27+): Warn (the default) drops them and answers a `Warning: 299` header, Ignore drops them,
  Strict answers 400 "strict decoding error: unknown field".
- RBAC: deny by default when `role` is given (the `rules` of a Role, e.g. the rendered chart's): a
  request no rule grants answers 403 Forbidden with the real message shape; `forbid(verb, resource)`
  denies one more. Without `role` everything is allowed.
- List: equality- and set-based label selectors (`a=b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`).
- Delete: propagationPolicy from DeleteOptions or the query (Jobs default to Orphan, as in batch/v1).
  Foreground keeps the Job, with deletionTimestamp and the `foregroundDeletion` finalizer, until its
  dependents are gone; Background removes the Job and has the "garbage collector" delete dependents;
  Orphan strips their ownerReferences. Pods terminate gracefully: a pod bound to a node gets
  deletionTimestamp = now + its grace period and stays until the kubelet reports it terminal and its
  finalizers are gone (an unbound pod goes at once, finalizers permitting).
- Logs: `container` must name a container (400 otherwise), a pod whose container has not started
  answers 400 "is waiting to start", `tailLines` is honoured.
- Faults: `fail_next(method, path_regex, status, times)` answers the next matching requests with that
  status (for the 5xx retry tests).
Controllers run when a test calls them (no background loop, so tests are deterministic):
`sync_jobs()` is one pass of the Job and TTL controllers (controllers.py says what they follow in the
real sources); `preempt`, `evict`, `taint_evict` and `gc_pod` are the disrupting controllers; `admit`
and `kueue_preempt` are Kueue. The kubelet (scheduling one node, running containers through a
pluggable runtime, graceful termination, evictions, a lost node) is `kubelet.Kubelet`;
`finish_terminations()` is the short form of "the kubelet confirmed every terminating pod".
The clock is `now` (replaceable) plus `advance(seconds)`.
Not modelled: watches, PATCH/PUT, Events beyond the FailedCreate list in `events`.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
from controllers import (INDEX_ANNOTATION, TRACKING_FINALIZER, JobController, add_disruption, is_terminal,
                         kueue_admit, kueue_preempt, ts)
from kubelet import terminate_pod
from kubernetes_validate.utils import ValidationError as SchemaError

RESOURCES = {
    # path segment → (api group prefix, kind, group for messages)
    "jobs": ("/apis/batch/v1", "Job", "batch"),
    "pods": ("/api/v1", "Pod", ""),
    "services": ("/api/v1", "Service", ""),
}
CREATABLE = {"jobs", "services"}  # pods come from the Job controller only
_PATH = re.compile(
    r"^(?P<prefix>/apis/batch/v1|/api/v1)/namespaces/(?P<ns>[^/]+)/(?P<resource>[a-z]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what generateName suffixes use


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int


class FakeApiServer:
    def __init__(self, namespaces: tuple[str, ...] = ("lathe",), kube_version: str = "1.33.0",
                 user: str = "system:serviceaccount:lathe:lathe", role: list[dict[str, Any]] | None = None) -> None:
        self.namespaces = set(namespaces)
        self.kube_version = kube_version
        self.user = user
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (resource, ns, name) → object
        self.logs: dict[tuple[str, str], str] = {}  # (ns, pod) → log text
        self.requests: list[tuple[str, str]] = []  # (method, path?query) in order
        self._offset = 0.0
        self.now = lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self._offset)
        self.role = role  # RBAC rules; None: allow everything
        self.events: list[dict[str, Any]] = []  # Events the controllers record (FailedCreate)
        self.refuse_pods: str | None = None  # an admission webhook's / quota's refusal of pod creation
        self.jobs = JobController(self)
        self.lost_nodes: set[str] = set()  # nodes whose kubelet stopped answering
        self.forced: set[str] = set()  # uids of pods deleted with grace 0 by PodGC
        self._kueue_saved: dict[str, Any] = {}
        self._forbidden: set[tuple[str, str]] = set()
        self.authorized: list[tuple[str, str]] = []
        self.warnings: list[str] = []  # Warning headers of the request being answered  # (verb, resource) of every request, for RBAC checks
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._rv = itertools.count(1000)
        self._suffix = itertools.count(7)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the clock the controllers and the API server read forward."""
        self._offset += seconds

    def forbid(self, verb: str, resource: str) -> None:
        self._forbidden.add((verb, resource))

    def fail_next(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, times))

    def get(self, resource: str, ns: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self.objects.get((resource, ns, name))
            return copy.deepcopy(obj) if obj else None

    def names(self, resource: str, ns: str) -> list[str]:
        with self._lock:
            return sorted(n for (r, s, n) in self.objects if r == resource and s == ns)

    def pods_of(self, ns: str, job: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(o) for (r, s, _), o in sorted(self.objects.items())
                    if r == "pods" and s == ns and o["metadata"].get("labels", {}).get("job-name") == job]

    def set_status(self, resource: str, ns: str, name: str, status: dict[str, Any]) -> None:
        """What the kubelet (pods) or the Job controller (jobs) would write to the status subresource.
        As the real validation (1.31+), a Job cannot get `Failed` without `FailureTarget` nor `Complete`
        without `SuccessCriteriaMet`."""
        true = {c["type"] for c in status.get("conditions", []) if c.get("status") == "True"}
        for final, interim in (("Failed", "FailureTarget"), ("Complete", "SuccessCriteriaMet")):
            if resource == "jobs" and final in true and interim not in true:
                raise ValueError(f"status.conditions: Invalid value: cannot set {final}=True condition "
                                 f"without the {interim}=True condition")
        with self._lock:
            obj = self.objects[(resource, ns, name)]
            obj["status"] = status
            self.bump(obj)

    def bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def set_log(self, ns: str, pod: str, text: str) -> None:
        self.logs[(ns, pod)] = text

    def admit(self, ns: str, job: str, node_selector: dict[str, str] | None = None,
              tolerations: list[dict[str, Any]] | None = None) -> None:
        """What Kueue does when a queued Job fits the quota: merge the flavor's scheduling, unsuspend."""
        with self._lock:
            kueue_admit(self.objects[("jobs", ns, job)], self._kueue_saved, node_selector, tolerations)

    def kueue_preempt(self, ns: str, job: str) -> None:
        """Kueue evicts the Job's workload (preemption by a higher-priority one): it is suspended again."""
        with self._lock:
            kueue_preempt(self.objects[("jobs", ns, job)], self._kueue_saved)

    def preempt(self, ns: str, pod: str, reason: str = "PreemptionByScheduler") -> None:
        """A disrupting controller: DisruptionTarget with `reason`, then a graceful delete."""
        with self._lock:
            obj = self._existing("pods", ns, pod)
            add_disruption(obj, reason, self.now())
            self.delete_pod(obj)

    def evict(self, ns: str, pod: str) -> None:
        """The Eviction API (node drain)."""
        self.preempt(ns, pod, "EvictionByEvictionAPI")

    def taint_evict(self, ns: str, pod: str) -> None:
        """The taint-eviction controller, once a NoExecute taint (node unreachable) outlasts the toleration."""
        self.preempt(ns, pod, "DeletionByTaintManager")

    def gc_pod(self, ns: str, pod: str) -> None:
        """PodGC for a pod whose node is gone: DisruptionTarget, phase Failed, then a forced delete."""
        with self._lock:
            obj = self._existing("pods", ns, pod)
            add_disruption(obj, "DeletionByPodGC", self.now())
            if not is_terminal(obj):
                obj["status"]["phase"] = "Failed"
            obj["metadata"].setdefault("deletionTimestamp", ts(self.now()))
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            self.forced.add(obj["metadata"]["uid"])
            self.sync_jobs()

    def delete_pod(self, pod: dict[str, Any]) -> None:
        """Graceful deletion: deletionTimestamp = now + grace for a bound pod; an unbound one goes at once."""
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            return
        grace = 0 if not pod["spec"].get("nodeName") or is_terminal(pod) else \
            pod["spec"].get("terminationGracePeriodSeconds", 30)
        meta["deletionTimestamp"] = ts(self.now() + dt.timedelta(seconds=grace))
        meta["deletionGracePeriodSeconds"] = grace
        self.bump(pod)

    def delete_object(self, resource: str, ns: str, name: str, policy: str) -> None:
        with self._lock:
            self._delete(resource, ns, name, policy)

    def collect(self) -> None:
        """Pods whose deletion is confirmed (terminal, unbound, or forced) and that hold no finalizer go."""
        for key, obj in list(self.objects.items()):
            meta = obj["metadata"]
            if key[0] != "pods" or not meta.get("deletionTimestamp") or meta.get("finalizers"):
                continue
            if is_terminal(obj) or not obj["spec"].get("nodeName") or meta["uid"] in self.forced:
                del self.objects[key]
        self._finish_foreground()

    def sync_jobs(self) -> None:
        """One pass of the Job controller (and the TTL controller) over every Job; see controllers.py."""
        with self._lock:
            self.jobs.sync()
            self.collect()

    def finish_terminations(self, exit_code: int = 143) -> None:
        """The kubelet confirms every terminating pod (its containers exited with `exit_code` on SIGTERM):
        the pod becomes terminal, the Job controller counts it and drops its finalizer, it goes away.
        Pods on a lost node (`lost_nodes`) stay Terminating, as they do on a real cluster."""
        with self._lock:
            for key, obj in list(self.objects.items()):
                if key[0] != "pods" or not obj["metadata"].get("deletionTimestamp") or is_terminal(obj):
                    continue
                if obj["spec"].get("nodeName") in self.lost_nodes:
                    continue
                terminate_pod(obj, exit_code, self.now())
            self.sync_jobs()

    # -- request handling ---------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append((method, raw_path))
            for fault in self._faults:
                if fault.times > 0 and fault.method == method and fault.path.search(url.path):
                    fault.times -= 1
                    phrase = HTTPStatus(fault.status).phrase
                    raise ApiError(fault.status, phrase.replace(" ", ""), f"injected fault: {phrase}")
            m = _PATH.match(url.path)
            if not m or m["resource"] not in RESOURCES or RESOURCES[m["resource"]][0] != m["prefix"]:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            ns, resource, name, sub = m["ns"], m["resource"], m["name"], m["sub"]
            if sub is not None and not (resource == "pods" and sub == "log" and method == "GET"):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            verb = {"GET": "get" if name else "list", "POST": "create", "DELETE": "delete"}.get(method)
            if verb is None or (verb == "create" and name):
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            self._authorize(verb, resource + (f"/{sub}" if sub else ""), ns)
            if ns not in self.namespaces:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                               {"name": ns, "kind": "namespaces"})
            if verb == "create":
                mode = query.get("fieldValidation", "Warn")
                if mode not in ("Ignore", "Warn", "Strict"):
                    raise ApiError(400, "BadRequest", f'fieldValidation must be one of Ignore, Warn, Strict; got "{mode}"')
                return 201, self._create(resource, ns, json.loads(body or b"{}"), mode)
            if verb == "list":
                return 200, self._list(resource, ns, query.get("labelSelector", ""))
            assert name is not None
            if sub == "log":
                return 200, self._log(ns, name, query)
            if verb == "get":
                return 200, copy.deepcopy(self._existing(resource, ns, name))
            options = json.loads(body) if body else {}
            policy = options.get("propagationPolicy") or query.get("propagationPolicy")
            return 200, self._delete(resource, ns, name, policy)

    def _authorize(self, verb: str, resource: str, ns: str) -> None:
        self.authorized.append((verb, resource))
        group = RESOURCES[resource.split("/")[0]][2]
        granted = self.role is None or any(
            group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
            and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])) for rule in self.role)
        if (verb, resource) in self._forbidden or not granted:
            raise ApiError(403, "Forbidden",
                           f'{resource}{"." + group if group else ""} is forbidden: User "{self.user}" cannot {verb} '
                           f'resource "{resource}" in API group "{group}" in the namespace "{ns}"',
                           {"kind": resource})

    def _existing(self, resource: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((resource, ns, name))
        if obj is None:
            group = RESOURCES[resource][2]
            raise ApiError(404, "NotFound", f'{resource}{"." + group if group else ""} "{name}" not found',
                           {"name": name, "group": group, "kind": resource})
        return obj

    def _create(self, resource: str, ns: str, obj: dict[str, Any], field_validation: str = "Warn") -> dict[str, Any]:
        if resource not in CREATABLE:
            raise ApiError(405, "MethodNotAllowed", f"creating {resource} is not supported by this stand-in")
        meta = obj.setdefault("metadata", {})
        kind = RESOURCES[resource][1]
        if meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
        name = meta.get("name")
        group = RESOURCES[resource][2]
        qualified = f"{kind}{'.' + group if group else ''}"
        if not name:
            raise ApiError(422, "Invalid", f'{qualified} "" is invalid: metadata.name: Required value: name or generateName is required')
        try:
            kubernetes_validate.validate(obj, self.kube_version, strict=False)
        except SchemaError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {path}: {exc.message}') from None
        for unknown in self._drop_unknown_fields(obj):
            if field_validation == "Strict":
                raise ApiError(400, "BadRequest", f'strict decoding error: unknown field "{unknown}"')
            if field_validation == "Warn":
                self.warnings.append(f'unknown field "{unknown}"')
        problems = _semantic_errors(resource, obj)
        if problems:
            raise ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {"; ".join(problems)}',
                           {"name": name, "kind": kind, "causes": [{"message": p} for p in problems]})
        if (resource, ns, name) in self.objects:
            raise ApiError(409, "AlreadyExists", f'{resource}{"." + group if group else ""} "{name}" already exists',
                           {"name": name, "group": group, "kind": resource})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion=str(next(self._rv)),
                    creationTimestamp=ts(self.now()), generation=1)
        if resource == "jobs":
            _default_job(obj)
        obj.setdefault("status", {})
        self.objects[(resource, ns, name)] = obj
        return copy.deepcopy(obj)

    def _drop_unknown_fields(self, obj: dict[str, Any]) -> list[str]:
        """Remove the fields the schema does not know (what decoding into the Go types does); their paths."""
        dropped = []
        for _ in range(100):
            try:
                kubernetes_validate.validate(obj, self.kube_version, strict=True)
                return dropped
            except SchemaError as exc:
                names = re.findall(r"'([^']+)' (?:was|were) unexpected", exc.message) or \
                    re.findall(r"'([^']+)'", exc.message.split("(")[-1])
                parent: Any = obj
                for part in exc.path:
                    parent = parent[part]
                for field in names:
                    parent.pop(field, None)
                    dropped.append(".".join([*(str(p) for p in exc.path), field]))
        return dropped

    def _list(self, resource: str, ns: str, selector: str) -> dict[str, Any]:
        match = parse_selector(selector)
        items = [copy.deepcopy(o) for (r, s, _), o in sorted(self.objects.items())
                 if r == resource and s == ns and match(o["metadata"].get("labels", {}))]
        kind = RESOURCES[resource][1]
        api_version = "batch/v1" if resource == "jobs" else "v1"
        return {"kind": f"{kind}List", "apiVersion": api_version,
                "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    def _log(self, ns: str, name: str, query: dict[str, str]) -> str:
        pod = self._existing("pods", ns, name)
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container") or (containers[0] if len(containers) == 1 else None)
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        states = {cs["name"]: cs.get("state", {}) for cs in pod.get("status", {}).get("containerStatuses", [])}
        state = states.get(container, {"waiting": {"reason": "ContainerCreating"}})
        if "waiting" in state:
            why = state["waiting"].get("reason", "ContainerCreating")
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {why}')
        text = self.logs.get((ns, name), "")
        if "tailLines" in query:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) > 0 else ""
        return text

    def _delete(self, resource: str, ns: str, name: str, policy: str | None) -> dict[str, Any]:
        obj = self._existing(resource, ns, name)
        policy = policy or ("Orphan" if resource == "jobs" else "Background")
        if policy not in ("Foreground", "Background", "Orphan"):
            raise ApiError(400, "BadRequest", f"invalid propagationPolicy {policy!r}")
        uid = obj["metadata"]["uid"]
        meta = obj["metadata"]
        if resource == "pods":
            self.delete_pod(obj)  # graceful: gone once the kubelet confirms and the finalizers are off
            self.collect()
            return copy.deepcopy(self.objects.get((resource, ns, name), obj))
        if policy == "Orphan":
            for dep in self._dependents(uid):
                dep["metadata"]["ownerReferences"] = [
                    r for r in dep["metadata"]["ownerReferences"] if r["uid"] != uid]
            del self.objects[(resource, ns, name)]
            return _success(resource, name, uid)
        for dep in self._dependents(uid):
            self._delete_dependent(dep)
        if policy == "Foreground" and self._dependents(uid):
            meta.setdefault("deletionTimestamp", ts(self.now()))
            meta["finalizers"] = sorted(set(meta.get("finalizers", [])) | {"foregroundDeletion"})
            return copy.deepcopy(obj)
        del self.objects[(resource, ns, name)]
        return _success(resource, name, uid)

    def _dependents(self, uid: str) -> list[dict[str, Any]]:
        return [o for o in self.objects.values()
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]

    def _delete_dependent(self, obj: dict[str, Any]) -> None:
        key = next(k for k, v in self.objects.items() if v is obj)
        if key[0] == "pods":
            self.delete_pod(obj)
        else:
            del self.objects[key]

    def _finish_foreground(self) -> None:
        for key, obj in list(self.objects.items()):
            meta = obj["metadata"]
            if "foregroundDeletion" in meta.get("finalizers", []) and not self._dependents(meta["uid"]):
                del self.objects[key]

    def create_job_pod(self, ns: str, job: dict[str, Any], index: int | None) -> None:
        """What the Job controller's pod create does (indexed_job_utils.go for the index fields)."""
        jname = job["metadata"]["name"]
        template = copy.deepcopy(job["spec"]["template"])
        meta = template.get("metadata", {})
        base = f"{jname}-{index}-" if index is not None else f"{jname}-"
        suffix = "".join(_SUFFIX_ALPHABET[(next(self._suffix) * 7 + i) % len(_SUFFIX_ALPHABET)] for i in range(5))
        name = base[:58] + suffix  # generateName keeps at most 58 characters of the prefix
        if self.refuse_pods is not None:  # admission refused it: the Job only gets an Event
            self.events.append({"type": "Warning", "reason": "FailedCreate", "involvedObject": {
                "kind": "Job", "name": jname, "namespace": ns},
                "message": f'Error creating: pods "{base}" is forbidden: {self.refuse_pods}'})
            return
        labels = dict(meta.get("labels", {}))
        annotations = dict(meta.get("annotations", {}))
        spec = template["spec"]
        if index is not None:
            labels[INDEX_ANNOTATION] = str(index)
            annotations[INDEX_ANNOTATION] = str(index)
            spec["hostname"] = f"{jname}-{index}"
            for c in spec["containers"]:
                c.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}})
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "generateName": base, "namespace": ns, "uid": str(uuid.uuid4()),
                "resourceVersion": str(next(self._rv)), "creationTimestamp": ts(self.now()),
                "labels": labels, "annotations": annotations, "finalizers": [TRACKING_FINALIZER],
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": jname,
                                     "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        self.objects[("pods", ns, name)] = pod


def _default_job(job: dict[str, Any]) -> None:
    """The defaults and generated selector the API server adds to a new Job."""
    spec = job["spec"]
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    # JobPodReplacementPolicy (on by default since 1.29): only Failed pods are replaced when a pod
    # failure policy is set, else terminating ones too.
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    uid, name = job["metadata"]["uid"], job["metadata"]["name"]
    generated = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                 "controller-uid": uid, "job-name": name}
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(generated)


def _semantic_errors(resource: str, obj: dict[str, Any]) -> list[str]:
    """Rules of the real validation (beyond the JSON schema) that the launcher's objects must meet."""
    errors: list[str] = []
    meta = obj["metadata"]
    name = meta["name"]
    for key, value in (meta.get("labels") or {}).items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(f"metadata.labels: Invalid value: {value!r}: a valid label value is ≤ 63 characters")
    if resource == "services":
        if len(name) > 63 or not _DNS1035_LABEL.match(name):
            errors.append(f"metadata.name: Invalid value: {name!r}: a DNS-1035 label")
        spec = obj.get("spec", {})
        if spec.get("clusterIP") == "None" and spec.get("type", "ClusterIP") != "ClusterIP":
            errors.append("spec.clusterIP: headless services must be of type ClusterIP")
        return errors
    spec = obj.get("spec", {})
    # The Job name becomes the value of the job-name label of its pods.
    if len(name) > 63 or not _DNS1123_LABEL.match(name):
        errors.append(f"metadata.name: Invalid value: {name!r}: must be no more than 63 characters (label value)")
    pod_spec = spec.get("template", {}).get("spec", {})
    restart = pod_spec.get("restartPolicy")
    if restart not in ("Never", "OnFailure"):
        errors.append(f"spec.template.spec.restartPolicy: Unsupported value: {restart!r}: supported values: \"OnFailure\", \"Never\"")
    if spec.get("podFailurePolicy") and restart != "Never":
        errors.append("spec.podFailurePolicy: Invalid value: only allowed with spec.template.spec.restartPolicy Never")
    containers = {c["name"] for c in pod_spec.get("containers", [])}
    for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules", [])):
        codes = rule.get("onExitCodes")
        if codes:
            if codes.get("containerName") and codes["containerName"] not in containers:
                errors.append(f"spec.podFailurePolicy.rules[{i}].onExitCodes.containerName: not a container of the template")
            if codes.get("operator") == "In" and 0 in codes.get("values", []):
                errors.append(f"spec.podFailurePolicy.rules[{i}].onExitCodes.values: 0 is not allowed with In")
        if bool(codes) == bool(rule.get("onPodConditions")):
            errors.append(f"spec.podFailurePolicy.rules[{i}]: exactly one of onExitCodes and onPodConditions")
    if spec.get("completionMode") == "Indexed" and not spec.get("completions"):
        errors.append("spec.completions: Required value: when completion mode is Indexed")
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if key in spec and spec[key] < (1 if key == "activeDeadlineSeconds" else 0):
            errors.append(f"spec.{key}: Invalid value: {spec[key]}: must be non-negative")
    if pod_spec.get("subdomain") and not _DNS1123_LABEL.match(pod_spec["subdomain"]):
        errors.append("spec.template.spec.subdomain: Invalid value: a DNS-1123 label")
    return errors + _pod_spec_errors(pod_spec, "spec.template.spec")


_QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")


def _pod_spec_errors(pod_spec: dict[str, Any], path: str) -> list[str]:
    """Quantities and the requests/limits rules for extended resources (GPUs)."""
    errors = []
    for i, volume in enumerate(pod_spec.get("volumes", [])):
        size = (volume.get("emptyDir") or {}).get("sizeLimit")
        if size is not None and not _QUANTITY.match(str(size)):
            errors.append(f"{path}.volumes[{i}].emptyDir.sizeLimit: Invalid value: {size!r}: quantities must match "
                          "the regular expression")
    for i, container in enumerate(pod_spec.get("containers", [])):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for key, value in resources.get(kind, {}).items():
                if not _QUANTITY.match(str(value)):
                    errors.append(f"{path}.containers[{i}].resources.{kind}[{key}]: Invalid value: {value!r}: "
                                  "quantities must match the regular expression")
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for key in set(requests) | set(limits):
            extended = "/" in key and not key.startswith("kubernetes.io/")
            if extended and requests.get(key, limits.get(key)) != limits.get(key):
                errors.append(f"{path}.containers[{i}].resources.requests[{key}]: Invalid value: must be equal to "
                              f"{key} limit (overcommit is not allowed for extended resources)")
    return errors


def parse_selector(selector: str):  # noqa: ANN201 (returns a predicate)
    """A label selector (the string form) → predicate over a labels dict."""
    requirements = []
    for part in _split_selector(selector):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", part)
        if m:
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}
            requirements.append(lambda l, k=key, o=op, v=values: (l.get(k) in v) if o == "in" else (l.get(k) not in v))
        elif "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            requirements.append(lambda l, k=key, v=value: l.get(k) != v)
        elif "=" in part:
            key, value = (s.strip() for s in part.replace("==", "=").split("=", 1))
            requirements.append(lambda l, k=key, v=value: l.get(k) == v)
        elif part.startswith("!"):
            requirements.append(lambda l, k=part[1:].strip(): k not in l)
        elif re.fullmatch(r"[\w./-]+", part):
            requirements.append(lambda l, k=part: k in l)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return lambda labels: all(r(labels) for r in requirements)


def _split_selector(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _success(resource: str, name: str, uid: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": name, "kind": resource, "uid": uid}}


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.api._lock:  # one request at a time: its Warning headers are its own
            self.api.warnings = []
            try:
                code, payload = self.api.handle(self.command, self.path, body)
            except ApiError as exc:
                code, payload = exc.code, exc.status()
            warnings = list(self.api.warnings)
        if isinstance(payload, str):  # pod logs are text/plain
            data, ctype = payload.encode(), "text/plain"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for text in warnings:
            escaped = text.replace("\\", "\\\\").replace('"', '\\"')
            self.send_header("Warning", f'299 - "{escaped}"')  # RFC 7234 quoted-string
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass
