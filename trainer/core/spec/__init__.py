"""JobSpec v1: everything a kohya sd-scripts + LyCORIS user can ask for, as one declarative document.

Torch-free on purpose: the service imports this package to validate specs before any GPU time is spent.
Field names follow sd-scripts' flags (`--network_dim` → `network.dim`, `--lr_scheduler` →
`scheduler.type`, …) and defaults are sd-scripts' defaults unless the comment says otherwise.
`decode_spec` turns JSON/TOML into a JobSpec and raises `SpecError` whose problems name the field path,
what was wrong and what to do; `check_spec` runs the cross-field rules (incompatible combinations).

One module per section (its Structs and its checker); `jobspec` assembles them, `decode` reads a
document, `check` runs the section checkers in order. Import from this package, not the modules.
"""

from trainer.core.spec.caption import TAGS_FILE, CaptionSpec
from trainer.core.spec.check import check_spec, warnings_for
from trainer.core.precision import Precision
from trainer.core.spec.common import (
    DEFAULT_MAX_TRAIN_STEPS,
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    Arch,
    Fraction,
    NonNegInt,
    OptionValue,
    PositiveInt,
    Reso,
    Sampler,
    ShortText,
    SpecVersion,
    Text,
    Uri,
)
from trainer.core.spec.dataset import (
    BUCKET_STEP_MULTIPLE,
    DatasetSpec,
    MaxTokenLength,
    SubsetSpec,
)
from trainer.core.spec.decode import decode_spec, encode_spec, spec_from_obj, spec_hash
from trainer.core.spec.derived import (
    CompileChoice,
    compile_choice,
    compiles_cleanly,
    total_steps,
    train_text_encoder,
    train_unet,
    warmup_steps,
)
from trainer.core.spec.grid import GridAdapterSpec, GridSpec, adapter_label
from trainer.core.spec.jobspec import JobSpec
from trainer.core.spec.kinds import (
    MAX_MERGE_RATIO,
    JobKind,
    MergeAdapterSpec,
    MergeSpec,
    check_kind,
)
from trainer.core.spec.model import ModelSpec
from trainer.core.spec.network import (
    BLOCK_COUNTS,
    UNSHRINKABLE_ALGOS,
    Algo,
    NetworkModule,
    NetworkSpec,
    Preset,
)
from trainer.core.spec.optimizer import (
    OptimizerSpec,
    OptimizerType,
    SchedulerSpec,
    SchedulerType,
)
from trainer.core.spec.problems import Problem, SpecError
from trainer.core.spec.prompts import parse_sample_prompt
from trainer.core.spec.resources import LoggingSpec, ResourcesSpec
from trainer.core.spec.sample import GridAxesSpec, GridAxis, SampleSpec
from trainer.core.spec.save import SaveSpec
from trainer.core.spec.shrink import ShrinkSpec
from trainer.core.spec.training import (
    Attention,
    DynamoBackend,
    NoiseSpec,
    PrecisionSpec,
    TrainingSpec,
)

__all__ = [
    "BLOCK_COUNTS", "BUCKET_STEP_MULTIPLE", "DEFAULT_MAX_TRAIN_STEPS", "MAX_MERGE_RATIO", "SPEC_VERSION",
    "SUPPORTED_VERSIONS", "TAGS_FILE", "UNSHRINKABLE_ALGOS",
    "Algo", "Arch", "Attention", "DynamoBackend", "Fraction", "GridAxis", "JobKind", "MaxTokenLength",
    "NetworkModule", "NonNegInt", "OptimizerType", "OptionValue", "PositiveInt", "Precision", "Preset", "Reso",
    "Sampler", "SchedulerType", "ShortText", "SpecVersion", "Text", "Uri",
    "CaptionSpec", "DatasetSpec", "GridAdapterSpec", "GridAxesSpec", "GridSpec", "JobSpec", "LoggingSpec",
    "MergeAdapterSpec", "MergeSpec", "ModelSpec", "NetworkSpec", "NoiseSpec", "OptimizerSpec", "PrecisionSpec",
    "ResourcesSpec", "SampleSpec", "SaveSpec", "SchedulerSpec", "ShrinkSpec", "SubsetSpec", "TrainingSpec",
    "CompileChoice", "Problem", "SpecError",
    "adapter_label", "compile_choice", "compiles_cleanly", "check_kind", "check_spec", "decode_spec", "encode_spec", "parse_sample_prompt",
    "spec_from_obj", "spec_hash", "total_steps", "train_text_encoder", "train_unet", "warmup_steps",
    "warnings_for",
]
