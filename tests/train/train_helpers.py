"""Helpers the training tests share: a spec on the tiny assets, loading, training, replacing a section.
(A module of its own, not conftest: `from conftest import` breaks when pytest collects several folders.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from trainer.core.spec import spec_from_obj


def make_spec(model_uri: str, data_uri: str, *, arch: str = "sd1", **sections: dict[str, Any]) -> Any:
    """A JobSpec for the tiny model at 64 px; `sections` override spec sections (dicts merge)."""
    obj: dict[str, Any] = {
        "version": 1,
        "model": {"uri": model_uri, "arch": arch, "v_parameterization": arch == "sd2"},
        "dataset": {"uri": data_uri, "resolution": 64, "caption_extension": ".txt", "max_data_loader_n_workers": 0},
        "network": {"dim": 4, "alpha": 2.0},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_train_steps": 2, "seed": 0},
        "save": {"output_name": "tiny"},
        "shrink": {"enabled": False},
        "resources": {"gpus": 0},
    }
    for name, values in sections.items():
        obj[name] = {**obj.get(name, {}), **values}
    return spec_from_obj(obj)


def load_everything(spec: Any, *, seed: int = 0) -> tuple[Any, Any, Any]:
    """(parts, network, dataset) for a spec whose URIs are local paths, seeded for the network init."""
    import torch

    from trainer.data.dataset import TrainDataset
    from trainer.core.dataset.layout import discover_layout
    from trainer.models.load import load_model
    from trainer.models.network import build_network
    from trainer.core.spec import train_text_encoder, train_unet
    from trainer.train.loop import seed_everything

    parts = load_model(spec.model, weight_dtype=torch.float32, device="cpu")
    root = spec.dataset.uri
    files = sorted(str(p.relative_to(root).as_posix()) for p in Path(root).rglob("*") if p.is_file())
    layout = discover_layout(spec, files)
    dataset = TrainDataset(layout, spec, root, tokenizers=parts.tokenizers,
                           max_token_length=spec.dataset.max_token_length, workers=1)
    seed_everything(seed)
    network = build_network(spec.network, parts, train_unet=train_unet(spec), train_text_encoder=train_text_encoder(spec))
    return parts, network, dataset


def train(spec: Any, tmp: Path, *, hooks: Any = None, resume_from: str | None = None, seed: int = 0,
          **kwargs: Any) -> tuple[Any, Any, Any]:
    """Load, train, return (result, network, parts)."""
    from accelerate.state import AcceleratorState

    from trainer.train.recipe import run_training

    # accelerate keeps one process-wide state (one job per process in production); tests run many.
    AcceleratorState._reset_state(reset_partial_state=True)
    parts, network, dataset = load_everything(spec, seed=seed)
    out, work = tmp / "out", tmp / "work"
    os.makedirs(out, exist_ok=True)
    result = run_training(spec, parts, network, dataset, out_dir=str(out), work_dir=str(work), hooks=hooks,
                          resume_from=resume_from, seed=seed, **kwargs)
    return result, network, parts


def replace(spec: Any, section: str, **values: Any) -> Any:
    return msgspec.structs.replace(spec, **{section: msgspec.structs.replace(getattr(spec, section), **values)})
