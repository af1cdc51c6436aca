"""Fixtures of the Kubernetes tests: the stand-in API server and a launcher bound to it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

sys.path.insert(0, str(Path(__file__).parent))  # fake_apiserver, kubelet, k8s_helpers

from fake_apiserver import FakeApiServer  # noqa: E402
from k8s_helpers import full_settings  # noqa: E402

from service.launchers.k8s.launcher import KubernetesLauncher  # noqa: E402


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(namespaces=("lathe",)) as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def launcher(api: FakeApiServer, sleeps: list[float]) -> KubernetesLauncher:
    configuration = k8s.Configuration(host=api.url)
    return KubernetesLauncher(full_settings(), k8s.ApiClient(configuration), sleep=sleeps.append,
                              request_timeout_s=10)
