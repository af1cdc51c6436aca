"""The `shrink` section: SVD rank reduction after training (or of `shrink.adapter`, kind "shrink")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.shrink_choice import SHRINK_METHODS, parse_recipe, split_method
from trainer.core.shrink_errors import ShrinkError
from trainer.core.precision import Precision
from trainer.core.spec.common import PositiveInt, Uri, _Base
from trainer.core.spec.network import UNSHRINKABLE_ALGOS
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec


class ShrinkSpec(_Base):
    """SVD rank reduction after training (`resize_lora.py` / elias-gaeros `resize_lora`)."""

    enabled: bool = True
    rank: PositiveInt | None = None  # --new_rank: fixed rank
    method: Literal[SHRINK_METHODS] | None = None  # --dynamic_method; `_legacy`: sd-scripts before PR #2194
    param: Annotated[float, Meta(gt=0.0)] | None = None  # --dynamic_param
    recipe: Annotated[str, Meta(max_length=200)] | None = "fro_ckpt=1,thr=-3.55"
    max_rank: PositiveInt | None = None
    save_precision: Precision | None = None
    plot: bool = True
    adapter: Uri | None = None  # kind = "shrink" only: the adapter file to reduce (s3:// or a local path)


def check_shrink(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, sh = out.err, out.warn, spec.shrink
    if not sh.enabled:
        return out
    if sh.rank is not None and sh.method is not None:
        err("shrink.rank", "give either shrink.rank or shrink.method/param, not both")
    if sh.method is not None and sh.param is None:
        err("shrink.param", f"shrink.method '{sh.method}' needs shrink.param")
    base_method = split_method(sh.method)[0] if sh.method else None
    if base_method == "sv_ratio" and sh.param is not None and sh.param < 1:
        err("shrink.param", f"{sh.method} needs a ratio ≥ 1 (largest / smallest kept singular value)")
    if base_method in ("sv_fro", "sv_cumulative") and sh.param is not None and sh.param > 1:
        err("shrink.param", f"{sh.method} needs a fraction in (0, 1]")
    if sh.param is not None and sh.method is None:
        err("shrink.param", "is only used with shrink.method (sv_ratio, sv_fro or sv_cumulative, or their "
            "_legacy forms); set one or remove shrink.param")
    if (sh.rank is None and sh.method is None and sh.recipe
            and spec.network.algo not in UNSHRINKABLE_ALGOS):
        try:  # the trainer parses it after training: refuse it now rather than skip the shrink then
            parse_recipe(sh.recipe)
        except ShrinkError as exc:
            err("shrink.recipe", str(exc))
    if sh.rank is None and sh.method is None and not sh.recipe:
        err("shrink.recipe", "give shrink.rank, shrink.method/param or shrink.recipe, or set shrink.enabled = false")
    if spec.network.algo in UNSHRINKABLE_ALGOS:
        warn("shrink.enabled", f"a '{spec.network.algo}' adapter has no low-rank LoRA form: the shrink phase is "
             "skipped and the full adapter published; set shrink.enabled = false to silence this")
    elif sh.rank is None and sh.method is None and spec.model.uri.lower().endswith(".ckpt"):
        warn("shrink.recipe", "the recipe compares against the base model, which is read from .safetensors or "
             "a diffusers folder only: with a .ckpt base the shrink phase is skipped; give shrink.rank or "
             "shrink.method instead")
    return out
