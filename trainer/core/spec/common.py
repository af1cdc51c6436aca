"""Types every spec section shares: the version, bounded scalars and the strict Struct base."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from msgspec import Meta, Struct


SPEC_VERSION = 1
SpecVersion = Literal[1]  # an enum in the published JSON schema: only these are accepted
SUPPORTED_VERSIONS = get_args(SpecVersion)
DEFAULT_MAX_TRAIN_STEPS = 1600  # sd-scripts' default when neither steps nor epochs are given

Arch = Literal["sd1", "sd2", "sdxl"]
Sampler = Literal[
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
    "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]

Uri = Annotated[str, Meta(min_length=1, max_length=2048)]
# Free-text fields get a bound too: an unbounded string would be stored in spec.json, copied into
# adapter metadata and read by every consumer (the bad-input corpus sends megabytes).
ShortText = Annotated[str, Meta(max_length=64)]  # extensions, separators
Text = Annotated[str, Meta(max_length=4000)]  # captions, tokens, prompts
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Reso = Annotated[int, Meta(ge=32, le=8192)]
OptionValue = Text | int | float | bool | Annotated[list[Text | int | float | bool], Meta(max_length=64)]


class _Base(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    pass
