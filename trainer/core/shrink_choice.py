"""How a shrink picks ranks: a fixed rank, one of sd-scripts' dynamic methods, or a resize_lora recipe.

Torch-free on purpose: the CLI checks its arguments with `make_rule` before torch is imported, and the
job spec check parses `shrink.recipe` with `parse_recipe` at submit, so a bad recipe is refused then
rather than after the training it would have followed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.core.shrink_errors import ShrinkError

SD_SCRIPTS_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# The same rules in the form of sd-scripts releases before its PR #2194, which keep one component more
# (rank = index + 2 where the current form has index + 1): named so that a rank chosen with an older
# sd-scripts can be reproduced. One table for the CLIs and the job spec.
LEGACY_SUFFIX = "_legacy"
SHRINK_METHODS = SD_SCRIPTS_METHODS + tuple(m + LEGACY_SUFFIX for m in SD_SCRIPTS_METHODS)


def split_method(method: str) -> tuple[str, bool]:
    """`sv_fro_legacy` → ("sv_fro", True); `sv_fro` → ("sv_fro", False)."""
    if method.endswith(LEGACY_SUFFIX):
        return method[: -len(LEGACY_SUFFIX)], True
    return method, False
SCORE_KEYS = ("spn_lora", "spn_ckpt", "subspace", "fro_lora", "fro_ckpt", "params")
BASE_SCORE_KEYS = frozenset({"spn_ckpt", "fro_ckpt", "subspace"})


@dataclass(frozen=True)
class Recipe:
    """A parsed `-r` recipe of resize_lora, e.g. `fro_ckpt=1,thr=-3.55`."""

    text: str
    weights: dict[str, float] = field(default_factory=dict)  # normalised to sum 1
    threshold: float | None = None
    size_mib: float | None = None
    rescale: float = 1.0

    @property
    def needs_base(self) -> bool:
        return any(abs(self.weights.get(k, 0.0)) > 1e-6 for k in BASE_SCORE_KEYS)


def parse_recipe(text: str) -> Recipe:
    raw = {k: 0.0 for k in SCORE_KEYS}
    threshold = size = None
    rescale = 1.0
    for part in text.split(","):
        key, _, value_text = part.strip().partition("=")
        value: float | None = None
        if value_text:
            try:
                value = float(value_text)
            except ValueError:
                raise ShrinkError(f"recipe '{text}': '{key}={value_text}' is not a number") from None
        if key in raw:
            raw[key] = 1.0 if value is None else value
        elif value is None:
            raise ShrinkError(f"recipe '{text}': '{key}' needs a value ('{key}=X')")
        elif key == "thr":
            threshold = value
        elif key == "size":
            size = value
        elif key == "rescale":
            rescale = value
        else:
            raise ShrinkError(
                f"recipe '{text}': unknown key '{key}' (known: {', '.join(SCORE_KEYS)}, thr, size, rescale)"
            )
    total = sum(raw.values())
    if total == 0.0:
        raise ShrinkError(f"recipe '{text}': give at least one score weight, e.g. 'fro_ckpt=1'")
    if threshold is None and size is None:
        raise ShrinkError(f"recipe '{text}': give a threshold 'thr=X' or a target size 'size=MiB'")
    if rescale <= 0:
        raise ShrinkError(f"recipe '{text}': rescale must be > 0")
    weights = {k: v / total for k, v in raw.items()}
    return Recipe(text=text, weights=weights, threshold=threshold, size_mib=size, rescale=rescale)


@dataclass(frozen=True)
class Rule:
    kind: str  # "rank" | "method" | "recipe"
    rank: int | None = None
    method: str | None = None
    param: float | None = None
    recipe: Recipe | None = None
    max_rank: int | None = None


def make_rule(
    rank: int | None, method: str | None, param: float | None, recipe: str | None, max_rank: int | None
) -> Rule:
    """Validates the choice of rule: a method wins, then a fixed rank, then the recipe.

    With a method, a given `rank` caps the dynamic rank, as sd-scripts' `--new_rank` does.
    """
    if max_rank is not None and max_rank < 1:
        raise ShrinkError(f"--max-rank must be ≥ 1 (got {max_rank})")
    if rank is not None and rank < 1:
        raise ShrinkError(f"--rank must be ≥ 1 (got {rank})")
    if method is not None:
        if method not in SHRINK_METHODS:
            raise ShrinkError(f"--method must be one of {', '.join(SHRINK_METHODS)} (got '{method}')")
        if param is None or not param > 0:
            raise ShrinkError(f"--method {method} needs --param > 0 (got {param})")
        caps = [c for c in (rank, max_rank) if c is not None]
        return Rule("method", rank=rank, method=method, param=param, max_rank=min(caps) if caps else None)
    if param is not None:
        raise ShrinkError(f"--param is only used with --method {'|'.join(SD_SCRIPTS_METHODS)}[{LEGACY_SUFFIX}]")
    if rank is not None:
        return Rule("rank", rank=rank, max_rank=max_rank)
    if recipe:
        return Rule("recipe", recipe=parse_recipe(recipe), max_rank=max_rank)
    raise ShrinkError("choose how to pick ranks: --rank N, --method M --param X, or --recipe 'fro_ckpt=1,thr=-3.55'")
