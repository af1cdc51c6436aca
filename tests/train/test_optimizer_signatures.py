"""The torch-free optimizer table (`trainer/core/optimizers.py`), which the spec check uses at submit, equals the
real classes: every `optimizer.type` builds the class named here, and its constructor takes exactly the
arguments listed. pyproject pins the packages that provide them, so the trainer image agrees."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from trainer.core.optimizers import OPTIMIZERS

REPO = Path(__file__).resolve().parents[2]

# Every optimizer the spec offers: (optimizer.type, class, the distribution that provides it).
CLASSES = [
    ("AdamW", "torch.optim.AdamW", "torch"),
    ("SGDNesterov", "torch.optim.SGD", "torch"),
    ("Lion", "lion_pytorch.Lion", "lion-pytorch"),
    ("Prodigy", "prodigyopt.Prodigy", "prodigyopt"),
    ("DAdaptAdam", "dadaptation.DAdaptAdam", "dadaptation"),
    ("Adafactor", "transformers.optimization.Adafactor", "transformers"),
    ("AdamW8bit", "bitsandbytes.optim.AdamW8bit", "bitsandbytes"),
    ("Lion8bit", "bitsandbytes.optim.Lion8bit", "bitsandbytes"),
    ("SGDNesterov8bit", "bitsandbytes.optim.SGD8bit", "bitsandbytes"),
]


def _constructor_args(cls: type) -> list[str]:
    """Keyword arguments a user may give: everything but `self`, `params`, `lr` and */** catch-alls."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items()
            if n not in ("self", "params", "lr") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_the_table_covers_every_optimizer_the_spec_offers() -> None:
    assert [c[0] for c in CLASSES] and {c[0] for c in CLASSES} == set(OPTIMIZERS)
    for kind, path, _ in CLASSES:
        entry = OPTIMIZERS[kind]
        assert f"{entry.module}.{entry.name}" == path


@pytest.mark.parametrize("kind, path, dist", CLASSES, ids=[f"{c[0]}={c[1]}" for c in CLASSES])
def test_listed_arguments_equal_the_installed_constructor(kind: str, path: str, dist: str) -> None:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert list(OPTIMIZERS[kind].args) == _constructor_args(cls), (
        f"{path} {importlib.metadata.version(dist)} takes other arguments than trainer/core/optimizers.py lists")


def test_the_packages_that_provide_them_are_pinned_compatibly() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    pins = {Requirement(r).name: Requirement(r).specifier for r in extras}
    for dist in sorted({c[2] for c in CLASSES} - {"torch"}):
        assert dist in pins and str(pins[dist]).startswith("~="), (dist, pins.get(dist))
        assert pins[dist].contains(importlib.metadata.version(dist).split("+")[0]), (dist, pins[dist])


def test_the_trainer_image_installs_the_torch_release_the_table_was_checked_against() -> None:
    # pyproject keeps torch open (>=2.4) for the image's choice of build; the image pins the release.
    dockerfile = (REPO / "Dockerfile").read_text()
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    assert pinned, "the Dockerfile must pin TORCH_VERSION"
    assert importlib.metadata.version("torch").split("+")[0] == pinned.group(1)
