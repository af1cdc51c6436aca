"""What the kubelet does to a container's command before exec: resolve env, expand `$(VAR)`.

Rules (Kubernetes `third_party/forked/golang/expansion`): `$(NAME)` is replaced by the value of a
variable defined for the container; an undefined `$(NAME)` stays as written; `$$` is an escaped `$`.
Env values come from `value` or, for the downward API, from `fieldRef` on the pod's metadata
(name, namespace, uid, labels['k'], annotations['k']). Secret references resolve from `secrets`.
"""

from __future__ import annotations

import re
from typing import Any

_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def container_env(pod: dict[str, Any], container: str, secrets: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    env: dict[str, str] = {}
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = (secrets or {}).get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise LookupError(f"secret {ref['name']}/{ref['key']} missing (CreateContainerConfigError)")
            if value is not None:
                env[var["name"]] = value
    return env


def command_line(pod: dict[str, Any], container: str, secrets: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The argv the container runtime would exec."""
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    env = container_env(pod, container, secrets)
    return [expand(arg, env) for arg in spec.get("command", []) + spec.get("args", [])]


def expand(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _field(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    if path in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return meta[path.split(".")[1]]
    m = _FIELD.match(path)
    if not m:
        raise ValueError(f"unsupported fieldRef {path}")
    return meta.get(m[1], {}).get(m[2], "")
