"""The `model` section: the base model, and its options checked against the architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from msgspec import Meta

from trainer.core.spec.common import Arch, Uri, _Base
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec


class ModelSpec(_Base):
    """The base model (`--pretrained_model_name_or_path`, `--v2`, `--v_parameterization`, …)."""

    uri: Uri  # diffusers folder or single-file checkpoint (.safetensors/.ckpt); s3:// or a local path
    arch: Arch = "sd1"  # sd1 (1.x), sd2 (2.x, --v2), sdxl (sdxl_train_network.py)
    v_parameterization: bool = False  # v-prediction (SD2.x 768-v models)
    vae: Uri | None = None  # --vae: a separate VAE (folder or single file)
    clip_skip: Annotated[int, Meta(ge=1, le=12)] | None = None  # 2 for anime models, 1 for realism
    no_half_vae: bool = False  # keep the VAE in fp32 (SDXL's VAE overflows in fp16)
    lowram: bool = False  # load weights straight to the accelerator to spare system RAM


def check_model(spec: JobSpec) -> list[Problem]:
    out = Found()
    warn, arch = out.warn, spec.model.arch
    if spec.model.v_parameterization and arch != "sd2":
        warn("model.v_parameterization", f"v-prediction is meant for SD2.x 768-v models, not {arch} "
             "(sd-scripts warns too); make sure the base model was trained that way")
    if arch == "sd2" and spec.model.clip_skip is not None:
        warn("model.clip_skip", "SD2.x with clip_skip is unexpected (sd-scripts warns too); leave it unset")
    if arch == "sdxl" and spec.model.clip_skip not in (None, 1, 2):
        warn("model.clip_skip", "SDXL uses the penultimate layers by construction; clip_skip is ignored")
    return out
