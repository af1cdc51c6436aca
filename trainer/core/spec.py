"""JobSpec v1: everything a kohya sd-scripts + LyCORIS user can ask for, as one declarative document.

Torch-free on purpose: the service imports this module to validate specs before any GPU time is spent.
Field names follow sd-scripts' flags (`--network_dim` → `network.dim`, `--lr_scheduler` →
`scheduler.type`, …) and defaults are sd-scripts' defaults unless the comment says otherwise.
`decode_spec` turns JSON/TOML into a JobSpec and raises `SpecError` whose problems name the field path,
what was wrong and what to do; `check_spec` runs the cross-field rules (incompatible combinations).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Meta, Struct

from trainer.core.dataset.layout import spec_problems as dataset_spec_problems
from trainer.core.loaders import loader_gaps
from trainer.core.optimizers import adafactor_relative_step, unknown_arg_message
from trainer.core.shrink_choice import parse_recipe
from trainer.core.shrink_errors import ShrinkError

SPEC_VERSION = 1
SpecVersion = Literal[1]  # an enum in the published JSON schema: only these are accepted
SUPPORTED_VERSIONS = get_args(SpecVersion)
DEFAULT_MAX_TRAIN_STEPS = 1600  # sd-scripts' default when neither steps nor epochs are given

Arch = Literal["sd1", "sd2", "sdxl"]
Precision = Literal["fp32", "fp16", "bf16"]
NetworkModule = Literal["lycoris.kohya", "networks.lora"]
# LyCORIS algorithms whose forward compiles with fullgraph=True (networks.lora does too).
COMPILE_CLEAN_ALGOS = ("lora", "locon")
Algo = Literal["lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "glora", "boft", "diag-oft"]
# Algos whose adapters have no low-rank ΔW = up·down form the shrink phase could reduce.
UNSHRINKABLE_ALGOS = frozenset({"ia3", "glora", "boft", "diag-oft"})
Preset = Literal[
    "full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only"
]
OptimizerType = Literal[
    "AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "DAdaptAdam", "Adafactor", "SGDNesterov",
    "SGDNesterov8bit",
]
SchedulerType = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "adafactor", "cosine_annealing_warm_restarts",
]
Sampler = Literal[
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
    "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]
Attention = Literal["sdpa", "xformers", "mem_eff_attn", "default"]
# sd-scripts' --dynamo_backend values that stock PyTorch provides (the others need extra packages).
DynamoBackend = Literal["inductor", "eager", "aot_eager", "cudagraphs"]
MaxTokenLength = Literal[75, 150, 225]

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

# block_dims / block_alphas lengths of sd-scripts' networks.lora (checked against networks/lora.py):
# SD1/2: NUM_OF_BLOCKS * 2 + NUM_OF_MID_BLOCKS = 12 + 1 + 12; SDXL: 1 (base) + 9 IN + 3 MID + 9 OUT + 1 (out).
BLOCK_COUNTS: dict[str, int] = {"sd1": 25, "sd2": 25, "sdxl": 23}
# Multiple of bucket_reso_steps that sd-scripts asserts per architecture (train_network / sdxl_train_network).
BUCKET_STEP_MULTIPLE: dict[str, int] = {"sd1": 64, "sd2": 64, "sdxl": 32}


class _Base(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    pass


class ModelSpec(_Base):
    """The base model (`--pretrained_model_name_or_path`, `--v2`, `--v_parameterization`, …)."""

    uri: Uri  # diffusers folder or single-file checkpoint (.safetensors/.ckpt); s3:// or a local path
    arch: Arch = "sd1"  # sd1 (1.x), sd2 (2.x, --v2), sdxl (sdxl_train_network.py)
    v_parameterization: bool = False  # v-prediction (SD2.x 768-v models)
    vae: Uri | None = None  # --vae: a separate VAE (folder or single file)
    clip_skip: Annotated[int, Meta(ge=1, le=12)] | None = None  # 2 for anime models, 1 for realism
    no_half_vae: bool = False  # keep the VAE in fp32 (SDXL's VAE overflows in fp16)
    lowram: bool = False  # load weights straight to the accelerator to spare system RAM


class SubsetSpec(_Base):
    """One `[[datasets.subsets]]` entry; unset options inherit the dataset's."""

    image_dir: Annotated[str, Meta(max_length=1024)]  # relative to the dataset root, e.g. "10_character"
    num_repeats: PositiveInt = 1
    class_tokens: Text | None = None  # caption when an image has no caption file
    is_reg: bool = False  # regularisation images (weighted by prior_loss_weight)
    caption_extension: ShortText | None = None
    keep_tokens: NonNegInt | None = None
    shuffle_caption: bool | None = None
    caption_separator: ShortText | None = None
    flip_aug: bool | None = None
    color_aug: bool | None = None
    random_crop: bool | None = None
    caption_dropout_rate: Fraction | None = None
    caption_dropout_every_n_epochs: NonNegInt | None = None
    caption_tag_dropout_rate: Fraction | None = None


class DatasetSpec(_Base):
    """Training images (`--train_data_dir`, `--reg_data_dir`, `--dataset_config`, bucketing, captions)."""

    uri: Uri  # folder of `<repeats>_<concept>` subfolders, or a .zip/.tar archive of one
    reg_uri: Uri | None = None  # --reg_data_dir, same layout, is_reg subsets
    # sd-scripts dataset TOML text ([general]/[[datasets]]/[[datasets.subsets]])
    config_toml: Annotated[str, Meta(max_length=256 * 1024)] | None = None
    subsets: Annotated[list[SubsetSpec], Meta(max_length=1000)] | None = None  # explicit subsets instead of folder discovery
    resolution: Reso | Annotated[list[Reso], Meta(min_length=2, max_length=2)] = 512  # int or [w, h]
    caption_extension: ShortText = ".caption"  # sd-scripts' default; the guides use ".txt"
    enable_bucket: bool = False
    min_bucket_reso: Reso = 256
    max_bucket_reso: Reso = 1024
    bucket_reso_steps: Annotated[int, Meta(ge=8, le=256)] = 64  # 32 is common for SDXL
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: NonNegInt = 0
    caption_separator: ShortText = ","
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    caption_dropout_rate: Fraction = 0.0
    caption_dropout_every_n_epochs: NonNegInt = 0
    caption_tag_dropout_rate: Fraction = 0.0
    max_token_length: MaxTokenLength | None = None  # None = 75 (one CLIP window)
    dataset_repeats: NonNegInt = 1  # --dataset_repeats (fine-tune metadata datasets; kept for parity)
    prior_loss_weight: Annotated[float, Meta(ge=0.0)] = 1.0
    max_data_loader_n_workers: NonNegInt = 8
    persistent_data_loader_workers: bool = False
    # A rerun (`lathe rerun`): the dataset-manifest.json of the job it repeats; the trainer fails with
    # dataset_changed when a file's bytes (sha256) differ from it.
    expect_manifest: Uri | None = None

    @property
    def resolution_wh(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])


class NetworkSpec(_Base):
    """What is trained (`--network_module`, `--network_dim/alpha`, `--network_args …`)."""

    module: NetworkModule = "lycoris.kohya"
    algo: Algo = "lora"
    preset: Preset = "full"
    dim: PositiveInt = 4  # network_dim (rank)
    alpha: Annotated[float, Meta(gt=0.0)] = 1.0  # scale = alpha / dim
    # conv (ResNet 3x3) layers. None means the module's own default, as in sd-scripts: lycoris.kohya trains
    # them at rank `dim` (when the preset includes convs), networks.lora leaves them out.
    conv_dim: NonNegInt | None = None
    conv_alpha: Annotated[float, Meta(gt=0.0)] | None = None  # None: lycoris.kohya → alpha; networks.lora → 1.0
    # Neuron dropout: --network_dropout for networks.lora, network_args "dropout=" for lycoris.kohya.
    dropout: Fraction | None = None
    rank_dropout: Fraction | None = None
    module_dropout: Fraction | None = None
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout_scale: bool = False
    train_norm: bool = False
    factor: Annotated[int, Meta(ge=-1)] = -1  # LoKr factor (-1: as balanced as possible)
    decompose_both: bool = False  # LoKr: decompose both Kronecker factors
    block_size: PositiveInt = 4  # DyLoRA unit
    block_dims: Annotated[list[PositiveInt], Meta(max_length=64)] | None = None  # networks.lora only: one rank per block
    block_alphas: Annotated[list[Annotated[float, Meta(gt=0.0)]], Meta(max_length=64)] | None = None
    conv_block_dims: Annotated[list[NonNegInt], Meta(max_length=64)] | None = None
    conv_block_alphas: Annotated[list[Annotated[float, Meta(gt=0.0)]], Meta(max_length=64)] | None = None
    weights: Uri | None = None  # --network_weights: continue from an existing adapter file
    train_unet_only: bool = False
    train_text_encoder_only: bool = False


class OptimizerSpec(_Base):
    """`--optimizer_type`, `--optimizer_args`, learning rates and stabilisers."""

    type: OptimizerType = "AdamW"
    # e.g. {"weight_decay": 0.01, "decouple": true}
    args: Annotated[dict[Annotated[str, Meta(max_length=100)], OptionValue], Meta(max_length=100)] = {}
    learning_rate: Annotated[float, Meta(ge=0.0)] = 2e-6  # sd-scripts' default; LoRA runs use ~1e-4
    unet_lr: Annotated[float, Meta(ge=0.0)] | None = None
    text_encoder_lr: Annotated[float, Meta(ge=0.0)] | Annotated[
        list[Annotated[float, Meta(ge=0.0)]], Meta(min_length=1, max_length=2)
    ] | None = None  # one value, or [te1, te2] for SDXL
    max_grad_norm: Annotated[float, Meta(ge=0.0)] = 1.0  # 0 disables clipping
    scale_weight_norms: Annotated[float, Meta(gt=0.0)] | None = None


class SchedulerSpec(_Base):
    """`--lr_scheduler`, warmup, cycles, power; plus a built-in cosine-with-warm-restarts schedule."""

    type: SchedulerType = "constant"
    warmup_steps: Annotated[float, Meta(ge=0.0)] = 0  # ≥ 1: steps; 0 < x < 1: ratio of total steps
    num_cycles: PositiveInt = 1  # cosine_with_restarts: 4 ⇒ three restarts
    power: Annotated[float, Meta(gt=0.0)] = 1.0  # polynomial
    # cosine_annealing_warm_restarts (the Russian guide's custom scheduler, built in; no code by name):
    cycle_steps: PositiveInt | None = None  # T_0: steps per cycle (default: total / num_cycles)
    cycle_mult: Annotated[float, Meta(ge=1.0)] = 1.0  # each cycle this many times longer
    cycle_warmup_steps: NonNegInt = 0  # linear warmup at the start of every restart
    peak_decay: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0  # peak LR multiplier per cycle
    min_lr_ratio: Fraction = 0.0  # floor as a fraction of the peak


class TrainingSpec(_Base):
    """Length, batch, accumulation, timesteps and loss weighting."""

    max_train_steps: PositiveInt | None = None  # None and no epochs ⇒ 1600
    max_train_epochs: PositiveInt | None = None  # wins over max_train_steps
    batch_size: PositiveInt = 1  # --train_batch_size
    gradient_accumulation_steps: PositiveInt = 1  # a step is one optimizer update
    gradient_checkpointing: bool = False
    seed: NonNegInt | None = None  # None: a random seed, recorded in the metadata
    min_snr_gamma: Annotated[float, Meta(gt=0.0)] | None = None
    min_timestep: Annotated[int, Meta(ge=0, le=999)] = 0
    max_timestep: Annotated[int, Meta(ge=1, le=1000)] = 1000


class NoiseSpec(_Base):
    noise_offset: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: Annotated[int, Meta(ge=1, le=16)] | None = None
    multires_noise_discount: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.3


class PrecisionSpec(_Base):
    """Precision and memory/speed switches."""

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    attention: Attention = "sdpa"  # --sdpa / --xformers / --mem_eff_attn
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    vae_batch_size: PositiveInt = 1
    # --torch_compile / --dynamo_backend: the step's forward and loss (UNet with the adapter hooks) run
    # under torch.compile, once per bucket shape. "auto": on where the job trains on CUDA with an adapter
    # that compiles into one graph (COMPILE_CLEAN), off on CPU, where compiling costs more than it saves.
    torch_compile: bool | Literal["auto"] = "auto"
    dynamo_backend: DynamoBackend = "inductor"


class SaveSpec(_Base):
    output_uri: Uri | None = None  # default: <job dir>/output/
    output_name: Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^/\\\x00]+$")] = "last"
    save_precision: Precision | None = None  # None: the trained dtype (fp32)
    save_model_as: Literal["safetensors"] = "safetensors"
    save_every_n_epochs: PositiveInt | None = None
    save_every_n_steps: PositiveInt | None = None
    save_last_n_epochs: PositiveInt | None = None
    save_last_n_steps: PositiveInt | None = None  # keep saves of the last N steps
    training_comment: Annotated[str, Meta(max_length=4000)] | None = None
    checkpoint_every_n_steps: PositiveInt | None = 500  # resumable state (Lathe; --save_state)
    keep_checkpoints: PositiveInt = 2
    keep_failed_outputs: bool = False
    # modelspec metadata
    title: Annotated[str, Meta(max_length=500)] | None = None
    author: Annotated[str, Meta(max_length=500)] | None = None
    description: Annotated[str, Meta(max_length=4000)] | None = None
    license: Annotated[str, Meta(max_length=500)] | None = None
    tags: Annotated[str, Meta(max_length=2000)] | None = None


class ShrinkSpec(_Base):
    """SVD rank reduction after training (`resize_lora.py` / elias-gaeros `resize_lora`)."""

    enabled: bool = True
    rank: PositiveInt | None = None  # --new_rank: fixed rank
    method: Literal["sv_ratio", "sv_fro", "sv_cumulative"] | None = None  # --dynamic_method
    param: Annotated[float, Meta(gt=0.0)] | None = None  # --dynamic_param
    recipe: Annotated[str, Meta(max_length=200)] | None = "fro_ckpt=1,thr=-3.55"
    max_rank: PositiveInt | None = None
    save_precision: Precision | None = None
    plot: bool = True
    adapter: Uri | None = None  # kind = "shrink" only: the adapter file to reduce (s3:// or a local path)


GridAxis = Literal["saves", "weight", "seed"]


class GridAxesSpec(_Base):
    """The two axes of a comparison grid (prompts are the third: one PNG per prompt), A1111's XYZ plot:
    `saves` (one column/row per adapter), `weight` (the adapter's multiplier), `seed`."""

    x: GridAxis = "saves"
    y: GridAxis = "weight"
    weights: Annotated[list[Annotated[float, Meta(ge=-10.0, le=10.0)]], Meta(min_length=1, max_length=16)] = msgspec.field(default_factory=lambda: [1.0])
    seeds: Annotated[list[Annotated[int, Meta(ge=0, lt=2**32)]], Meta(max_length=16)] = []  # [] → the prompt's --d


class GridAdapterSpec(_Base):
    """One adapter input of a grid: a finished job's saves (`job`, expanded by the service at submit into
    the saves still kept plus the final file) or one adapter file (`uri`)."""

    uri: Uri | None = None
    job: Annotated[str, Meta(max_length=64, pattern=r"^j-[0-9]{8}t[0-9]{6}-[0-9a-f]{8}$")] | None = None
    label: Annotated[str, Meta(max_length=200)] | None = None  # the axis label (default: the file name)


class GridSpec(GridAxesSpec):
    """kind = "grid": render prompts over adapters × weights × seeds on `model.uri`."""

    adapters: Annotated[list[GridAdapterSpec], Meta(min_length=1, max_length=64)] = []
    prompts: Annotated[list[Text], Meta(min_length=1, max_length=16)] = []  # kohya prompt syntax, as sample.prompts
    sampler: Sampler = "ddim"


class SampleSpec(_Base):
    """Sample images during training: `--sample_prompts`, `--sample_every_n_*`, `--sample_sampler`."""

    # "prompt --n neg --w 512 --h 512 --d 1 --l 7 --s 20"
    prompts: Annotated[list[Text], Meta(max_length=1000)] = []
    sampler: Sampler = "ddim"
    every_n_steps: PositiveInt | None = None
    every_n_epochs: PositiveInt | None = None
    at_first: bool = False  # also before the first step
    grid: GridAxesSpec | None = None  # at the end, a grid over this job's saves (see GridAxesSpec)


class ResourcesSpec(_Base):
    gpus: Annotated[int, Meta(ge=0, le=16)] = 1  # processes per node (0: CPU)
    nodes: Annotated[int, Meta(ge=1, le=64)] = 1
    cpu: Annotated[str, Meta(max_length=16, pattern=r"^[0-9]+(\.[0-9]+|m)?$")] | None = None
    memory: Annotated[str, Meta(max_length=16, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")] | None = None
    shm_size: Annotated[str, Meta(max_length=16, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")] = "16Gi"
    gpu_type: Annotated[str, Meta(max_length=63)] | None = None
    max_runtime_s: Annotated[int, Meta(ge=60)] | None = None
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3


class LoggingSpec(_Base):
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    log_prefix: Annotated[str, Meta(max_length=200)] | None = None
    log_every_n_steps: PositiveInt = 1
    debug: bool = False


JobKind = Literal["train", "merge", "shrink", "caption", "grid"]
MAX_MERGE_RATIO = 10.0  # sd-scripts' merge takes any ratio, negative ones too; beyond ±10 is a typo


class MergeAdapterSpec(_Base):
    uri: Uri  # an adapter file (.safetensors), e.g. a finished job's output
    ratio: Annotated[float, Meta(ge=-MAX_MERGE_RATIO, le=MAX_MERGE_RATIO)] = 1.0


class MergeSpec(_Base):
    """kind = "merge": fold adapters into `model.uri`, giving a checkpoint in the base's own form."""

    adapters: Annotated[list[MergeAdapterSpec], Meta(min_length=1, max_length=16)]
    save_precision: Precision | None = None  # single-file output: None keeps the base's dtypes


class CaptionSpec(_Base):
    """kind = "caption": a new version of `dataset.uri` (a folder) with one caption file per image,
    tagged by the WD14-format tagger at `model.uri` (its .onnx and selected_tags.csv) and/or edited
    by the tag operations; with no `model` only the tag operations run. The tagger options keep
    `python -m trainer tag`'s (sd-scripts') names and meanings."""

    thresh: Fraction = 0.35
    general_threshold: Fraction | None = None  # None: thresh
    character_threshold: Fraction | None = None  # None: thresh
    undesired_tags: Annotated[list[Text], Meta(max_length=1000)] = []
    remove_underscore: bool = True
    character_tags_first: bool = True
    character_tag_expand: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    always_first_tags: Annotated[list[Text], Meta(max_length=100)] = []
    trigger_word: Text | None = None  # the first tag of every caption (what keep_tokens = 1 keeps)
    append_tags: bool = False  # keep an image's existing caption and add the new tags after it
    caption_extension: ShortText = ".txt"
    batch_size: Annotated[int, Meta(ge=1, le=1024)] = 8
    # Sentence captioners (a transformers image-to-text folder as model.uri), make_captions.py's options:
    beam_search: bool = False  # beam search with num_beams; otherwise nucleus sampling with top_p
    num_beams: Annotated[int, Meta(ge=1, le=64)] = 1
    top_p: Fraction = 0.9
    max_length: Annotated[int, Meta(ge=1, le=512)] = 75  # tokens
    min_length: Annotated[int, Meta(ge=0, le=512)] = 5
    # Tag operations, applied after tagging in this order: replace, remove, add, min_count, dedupe, trigger.
    replace: Annotated[dict[Text, Text], Meta(max_length=1000)] = {}  # old tag → new tag
    remove: Annotated[list[Text], Meta(max_length=1000)] = []
    add: Annotated[list[Text], Meta(max_length=1000)] = []
    add_first: bool = False
    min_count: NonNegInt = 0  # drop tags found in fewer captions than this
    dedupe: bool = False
    remove_orphans: bool = False  # leave out caption files without an image
    output_uri: Uri | None = None  # where the new version goes (empty); None: <job output>/dataset/


class JobSpec(_Base):
    """A whole job. `version` is required so that a future v2 is never misread as v1. `kind` says
    what the job does: "train" (the default) trains an adapter on `dataset`; "merge" needs no
    dataset and reads the `merge` section; "shrink" reduces `shrink.adapter` against `model.uri`;
    "caption" writes a captioned copy of `dataset.uri` (`caption` section; `model.uri` is the tagger,
    none: tag operations only)."""

    version: SpecVersion
    model: ModelSpec | None = None  # required for every kind but "caption"
    kind: JobKind = "train"
    dataset: DatasetSpec | None = None  # required for kind "train"
    merge: MergeSpec | None = None  # required for kind "merge"
    caption: CaptionSpec | None = None  # required for kind "caption"
    grid: GridSpec | None = None  # required for kind "grid"
    name: Annotated[str, Meta(max_length=200)] | None = None
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)
    optimizer: OptimizerSpec = msgspec.field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = msgspec.field(default_factory=SchedulerSpec)
    training: TrainingSpec = msgspec.field(default_factory=TrainingSpec)
    noise: NoiseSpec = msgspec.field(default_factory=NoiseSpec)
    precision: PrecisionSpec = msgspec.field(default_factory=PrecisionSpec)
    save: SaveSpec = msgspec.field(default_factory=SaveSpec)
    shrink: ShrinkSpec = msgspec.field(default_factory=ShrinkSpec)
    sample: SampleSpec = msgspec.field(default_factory=SampleSpec)
    resources: ResourcesSpec = msgspec.field(default_factory=ResourcesSpec)
    logging: LoggingSpec = msgspec.field(default_factory=LoggingSpec)


# ---------------------------------------------------------------------------------------------
# Errors


class Problem(Struct, frozen=True):
    path: str  # dotted field path, e.g. "network.block_dims"
    message: str  # what is wrong and what to do
    severity: Literal["error", "warning"] = "error"


class SpecError(ValueError):
    """An invalid spec; `problems` name each field path and what to do."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


# Options of sd-scripts that a multi-tenant service refuses or that moved; the message says why.
_REFUSED_OPTIONS = {
    "lr_scheduler_type": "loads an arbitrary Python class by name, which a multi-tenant service refuses; "
    "use scheduler.type = 'cosine_annealing_warm_restarts' (built in) or one of the standard schedulers",
    "lr_scheduler_args": "belongs to lr_scheduler_type, which is refused; use the scheduler.* fields",
    "optimizer_type": "is called optimizer.type here",
    "network_dim": "is called network.dim here",
    "network_alpha": "is called network.alpha here",
    "network_module": "is called network.module here",
    "pretrained_model_name_or_path": "is called model.uri here",
    "train_data_dir": "is called dataset.uri here",
}


def _field_names(struct_type: type) -> list[str]:
    return list(struct_type.__struct_fields__)


def _resolve_path(path: list[str]) -> Any:
    """The annotation at a field path inside JobSpec (for listing allowed values)."""
    tp: Any = JobSpec
    for part in path:
        if part.startswith("["):
            args = [a for a in get_args(tp) if a is not type(None)]
            tp = args[0] if args else tp
            while get_origin(tp) is Annotated:  # list fields with a length bound: Annotated[list[X], Meta]
                tp = get_args(tp)[0]
            tp = get_args(tp)[-1] if get_args(tp) else tp  # the item (list) or value (dict) type
            continue
        hints = msgspec.structs.fields(tp) if isinstance(tp, type) and issubclass(tp, Struct) else None
        if hints is None:
            # unwrap Optional / Annotated
            for arg in get_args(tp):
                if isinstance(arg, type) and issubclass(arg, Struct):
                    tp = arg
                    break
            else:
                return None
            hints = msgspec.structs.fields(tp)
        match = [f for f in hints if f.name == part]
        if not match:
            return None
        tp = match[0].type
    return tp


def _literal_values(tp: Any) -> list[Any]:
    values: list[Any] = []
    origin_args = get_args(tp)
    if getattr(tp, "__origin__", None) is Literal:
        return list(origin_args)
    for arg in origin_args:
        values.extend(_literal_values(arg))
    return values


_PATH_RE = re.compile(r"at `\$(?P<path>[^`]*)`")


def _join(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[") or "(root)"


def _unknown_field(parts: list[str], name: str) -> Problem:
    parent = _resolve_path(parts)
    allowed = _field_names(parent) if isinstance(parent, type) and issubclass(parent, Struct) else []
    if name in _REFUSED_OPTIONS:
        return Problem(_join([*parts, name]), f"unknown field: '{name}' {_REFUSED_OPTIONS[name]}")
    return Problem(_join([*parts, name]), f"unknown field '{name}'; allowed fields here: {', '.join(allowed)}")


def _missing_field(parts: list[str], name: str) -> Problem:
    return Problem(_join([*parts, name]), f"required field '{name}' is missing")


def _explain_validation(exc: msgspec.ValidationError, base: list[str] | None = None) -> Problem:
    """msgspec's error for a value converted at field path `base` (its own path is relative to it)."""
    text = str(exc)
    m = _PATH_RE.search(text)
    raw = m.group("path") if m else ""
    # "[...]" is msgspec's placeholder for a dict key: keep it whole (splitting on "." mangled it).
    parts = [*(base or []), *re.findall(r"\[[^\]]*\]|[^.\[]+", raw)]
    message = _PATH_RE.sub("", text).strip().rstrip("-").strip()
    unknown = re.match(r"Object contains unknown field `(?P<f>[^`]+)`", message)
    if unknown:
        return _unknown_field(parts, unknown.group("f"))
    missing = re.match(r"Object missing required field `(?P<f>[^`]+)`", message)
    if missing:
        return _missing_field(parts, missing.group("f"))
    allowed = _literal_values(_resolve_path(parts)) if parts else []
    if allowed:
        message += f"; allowed values: {', '.join(map(repr, allowed))}"
    return Problem(_join(parts), message)


# ---------------------------------------------------------------------------------------------
# Decoding


def spec_from_obj(obj: Any) -> JobSpec:
    """Validate a decoded JSON/TOML object as a JobSpec (types, ranges, cross-field rules). The
    SpecError lists every problem found: each bad field, not only the first."""
    if not isinstance(obj, dict):
        raise SpecError([Problem("(root)", "a job spec is an object (JSON) or a table (TOML)")])
    version = obj.get("version")
    if version is None:
        raise SpecError([Problem("version", f"required field 'version' is missing; supported: {list(SUPPORTED_VERSIONS)}")])
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise SpecError([
            Problem("version", f"unsupported spec version {version!r}; supported versions: {list(SUPPORTED_VERSIONS)}")
        ])
    clean, unsafe = _without_unsafe_values(obj)
    bad = [p.path for p in unsafe]
    problems = unsafe[:MAX_UNSAFE_REPORTED] + [
        p for p in _struct_problems(clean, JobSpec, []) if not any(_is_under(p.path, u) for u in bad)
    ]
    if problems:
        raise SpecError(problems)
    try:
        spec = msgspec.convert(obj, JobSpec, strict=True)
    except msgspec.ValidationError as exc:  # a rule the field-by-field pass does not see; never expected
        raise SpecError([_explain_validation(exc)]) from None
    _apply_implied_options(spec)
    errors = [p for p in check_spec(spec) if p.severity == "error"]
    if errors:
        raise SpecError(errors)
    return spec


# One bad value must not hide the next: msgspec stops at the first error, so the object is checked field
# by field against the Structs' own annotations (each type and bound stays written once, on its field).


def _struct_problems(obj: dict[str, Any], struct: type, parts: list[str]) -> list[Problem]:
    """Every unknown field, missing required field and bad value of `obj` read as `struct`."""
    out: list[Problem] = []
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    for key, value in obj.items():
        if key not in fields:
            out.append(_unknown_field(parts, str(key)))
        else:
            out += _value_problems(value, fields[key].type, [*parts, key])
    out += [_missing_field(parts, f.encode_name) for f in fields.values() if f.required and f.encode_name not in obj]
    return out


def _value_problems(value: Any, tp: Any, parts: list[str]) -> list[Problem]:
    try:
        msgspec.convert(value, tp, strict=True)
        return []
    except msgspec.ValidationError as exc:
        first = _explain_validation(exc, parts)
    if first.path == _join(parts):
        return [first]  # the value as a whole is wrong (its type, a list's length): nothing finer to say
    kind, inner = _container_for(tp, value)
    found: list[Problem] = []
    if kind == "struct":
        found = _struct_problems(value, inner, parts)
    elif kind == "list":
        found = [p for i, item in enumerate(value) for p in _value_problems(item, inner, [*parts, f"[{i}]"])]
    elif kind == "dict":
        found = [p for key, item in value.items() for p in _value_problems(item, inner, [*parts, str(key)])]
    return found or [first]


def _container_for(tp: Any, value: Any) -> tuple[str | None, Any]:
    """How to look inside `value` read as `tp`: ("struct", S), ("list", item type), ("dict", value
    type) or (None, None), through Annotated and unions (the arm that fits the value's JSON kind)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, Struct):
        return ("struct", tp) if isinstance(value, dict) else (None, None)
    origin = get_origin(tp)
    if origin is list:
        return ("list", get_args(tp)[0]) if isinstance(value, list) else (None, None)
    if origin is dict:
        return ("dict", get_args(tp)[1]) if isinstance(value, dict) else (None, None)
    for arm in get_args(tp):  # a union
        found = _container_for(arm, value)
        if found[0] is not None:
            return found
    return None, None


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith((root + ".", root + "["))


MAX_SPEC_DEPTH = 16  # a real spec nests 4 levels (optimizer.args.<key>[i]); JSON allows ~1000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_UNSAFE_REPORTED = 20


def _without_unsafe_values(obj: Any) -> tuple[Any, list[Problem]]:
    """A copy of `obj` with every value no field can hold replaced by 0, and a problem for each:
    NaN/infinity (JSON as Python reads it and TOML both allow them), integers outside 64 bits (they
    pass `int` fields but overflow torch.manual_seed and friends in the trainer: an `internal`
    failure, retried) and nesting deeper than any field (msgspec and a recursive walk would hit the
    interpreter's recursion limit: a 500). The copy lets the field checks look at everything else.
    Iterative on purpose."""
    problems: list[Problem] = []
    root: list[Any] = [None]
    stack: list[tuple[Any, str, int, Any, Any]] = [(obj, "", 0, root, 0)]
    while stack:
        value, path, depth, parent, slot = stack.pop()
        where = path or "(root)"
        problem = None
        if depth > MAX_SPEC_DEPTH:
            problem = f"nested more than {MAX_SPEC_DEPTH} levels deep; no spec field nests like that"
        elif isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number (not NaN or infinity)"
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            problem = "is out of range: integers must fit in 64 bits (|n| < 9.2e18)"
        if problem is not None:
            problems.append(Problem(where, problem))
            parent[slot] = 0
        elif isinstance(value, dict):
            parent[slot] = copy = dict.fromkeys(value)
            stack.extend((item, f"{path}.{key}" if path else str(key), depth + 1, copy, key)
                         for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            parent[slot] = copy = [None] * len(value)
            stack.extend((item, f"{path}[{i}]", depth + 1, copy, i) for i, item in reversed(list(enumerate(value))))
        else:
            parent[slot] = value
    return root[0], problems


def _apply_implied_options(spec: JobSpec) -> None:
    """Options that imply others in sd-scripts: `--cache_latents_to_disk` turns on `--cache_latents`, and
    `--cache_text_encoder_outputs_to_disk` turns on `--cache_text_encoder_outputs`. Set them here so every
    consumer of the spec sees the same, complete picture."""
    prec = spec.precision
    if prec.cache_latents_to_disk:
        prec.cache_latents = True
    if prec.cache_text_encoder_outputs_to_disk:
        prec.cache_text_encoder_outputs = True


def compiles_cleanly(network: NetworkSpec) -> bool:
    """Whether the adapter's forward traces into one graph (the tests check these with fullgraph=True);
    the others (LoHa, LoKr, …) break the graph, and "auto" leaves them eager."""
    return network.module == "networks.lora" or network.algo in COMPILE_CLEAN_ALGOS


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    fullgraph: bool  # the adapter traces into one graph (tests hold it to that)
    warning: str | None = None


def compile_choice(spec: JobSpec, *, cuda: bool) -> CompileChoice:
    """What `precision.torch_compile` means for this job on this machine: "auto" compiles on CUDA for the
    adapters that trace into one graph, never on CPU (where compiling costs more than it saves)."""
    setting, clean = spec.precision.torch_compile, compiles_cleanly(spec.network)
    if setting is False or (setting == "auto" and not cuda):
        return CompileChoice(False, False)
    if setting == "auto" and not clean:
        return CompileChoice(False, False, f"precision.torch_compile 'auto': network.algo '{spec.network.algo}' does "
                             "not compile into one graph, so the step runs eager (set torch_compile true to compile "
                             "it with graph breaks)")
    return CompileChoice(True, clean)


def decode_spec(data: bytes | str, *, format: Literal["json", "toml", "auto"] = "auto") -> JobSpec:
    """JSON or TOML bytes → a checked JobSpec, or SpecError naming the field paths."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError([Problem("(root)", "the spec is not UTF-8 text")]) from None
    else:
        text = data
    if format == "auto":
        format = "json" if text.lstrip().startswith("{") else "toml"
    try:
        obj = json.loads(text) if format == "json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SpecError([Problem("(root)", f"not valid {format.upper()}: {exc}")]) from None
    return spec_from_obj(obj)


def load_spec_file(path: str) -> JobSpec:
    with open(path, "rb") as fh:
        data = fh.read()
    fmt: Literal["json", "toml", "auto"] = "toml" if path.endswith(".toml") else "json" if path.endswith(".json") else "auto"
    return decode_spec(data, format=fmt)


def encode_spec(spec: JobSpec) -> bytes:
    """Canonical JSON (sorted keys), the form stored as spec.json and hashed."""
    return msgspec.json.format(msgspec.json.encode(spec, order="sorted"), indent=2)


def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(msgspec.json.encode(spec, order="sorted")).hexdigest()


def json_schema() -> dict[str, Any]:
    return msgspec.json.schema(JobSpec)


# ---------------------------------------------------------------------------------------------
# Derived values


def total_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    """Optimizer updates for the run: epochs win over steps; 1600 when neither is given (sd-scripts)."""
    if spec.training.max_train_epochs is not None:
        return spec.training.max_train_epochs * max(1, steps_per_epoch)
    return spec.training.max_train_steps or DEFAULT_MAX_TRAIN_STEPS


def warmup_steps(spec: JobSpec, total: int) -> int:
    w = spec.scheduler.warmup_steps
    return int(round(w * total)) if 0 < w < 1 else int(w)


def train_text_encoder(spec: JobSpec) -> bool:
    """Whether the text encoder(s) are trained (sd-scripts: unless --network_train_unet_only)."""
    return not spec.network.train_unet_only


def train_unet(spec: JobSpec) -> bool:
    return not spec.network.train_text_encoder_only


_SAMPLE_OPTION_RE = re.compile(r"--(n|w|h|d|l|s)\s")


def parse_sample_prompt(line: str) -> dict[str, Any]:
    """sd-scripts' prompt line: `text --n negative --w 512 --h 512 --d seed --l cfg --s steps`."""
    parts = re.split(r"\s--(?=[nwhdls]\s)", " " + line.strip())
    out: dict[str, Any] = {"prompt": parts[0].strip(), "negative_prompt": "", "width": 512, "height": 512,
                           "seed": None, "scale": 7.5, "steps": 30}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        value = value.strip()
        try:
            if key == "n":
                out["negative_prompt"] = value
            elif key == "w":
                out["width"] = int(value)
            elif key == "h":
                out["height"] = int(value)
            elif key == "d":
                out["seed"] = int(value)
            elif key == "l":
                out["scale"] = float(value)
            elif key == "s":
                out["steps"] = int(value)
        except ValueError:
            raise ValueError(f"option --{key} expects a number, got {value!r}") from None
    return out


# ---------------------------------------------------------------------------------------------
# Cross-field rules


# NetworkSpec fields only lycoris.kohya reads, with their defaults.
_LYCORIS_ONLY_DEFAULTS: dict[str, Any] = {
    "preset": "full", "use_tucker": False, "use_scalar": False, "rank_dropout_scale": False, "train_norm": False,
    "factor": -1, "decompose_both": False, "block_size": 4,
}


_QUANTITY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    """A memory quantity of resources.memory / shm_size (digits and an optional unit) in bytes."""
    digits = quantity.rstrip("KMGTi")
    return int(digits) * _QUANTITY_UNITS[quantity[len(digits):]]


def check_spec(spec: JobSpec) -> list[Problem]:
    """Incompatible combinations (errors) and questionable ones (warnings), with what to do."""
    out: list[Problem] = []

    def err(path: str, msg: str) -> None:
        out.append(Problem(path, msg))

    def warn(path: str, msg: str) -> None:
        out.append(Problem(path, msg, "warning"))

    kind_problems = check_kind(spec)
    if kind_problems or spec.kind != "train":
        return kind_problems

    ds, net, opt, sch, tr, prec, sv, sh, arch = (
        spec.dataset, spec.network, spec.optimizer, spec.scheduler, spec.training, spec.precision,
        spec.save, spec.shrink, spec.model.arch,
    )
    subsets = ds.subsets or []
    any_shuffle = ds.shuffle_caption or any(s.shuffle_caption for s in subsets)
    any_caption_dropout = (
        ds.caption_dropout_rate > 0 or ds.caption_tag_dropout_rate > 0 or ds.caption_dropout_every_n_epochs > 0
        or any((s.caption_dropout_rate or 0) > 0 or (s.caption_tag_dropout_rate or 0) > 0 for s in subsets)
    )

    # Text-encoder output caching freezes the captions.
    if prec.cache_text_encoder_outputs or prec.cache_text_encoder_outputs_to_disk:
        if any_shuffle:
            err("precision.cache_text_encoder_outputs",
                "cannot be combined with dataset.shuffle_caption (cached outputs fix the caption order); "
                "turn one of them off")
        if any_caption_dropout:
            err("precision.cache_text_encoder_outputs",
                "cannot be combined with caption dropout (cached outputs fix the captions); set the dropout rates to 0")
        if train_text_encoder(spec):
            err("precision.cache_text_encoder_outputs",
                "needs a frozen text encoder: set network.train_unet_only = true")

    # Latent caching freezes the pixels.
    if prec.cache_latents or prec.cache_latents_to_disk:
        if ds.color_aug or any(s.color_aug for s in subsets):
            err("precision.cache_latents", "cannot be combined with dataset.color_aug (cached latents fix the "
                "pixels); turn one of them off")
        if ds.random_crop or any(s.random_crop for s in subsets):
            err("precision.cache_latents", "cannot be combined with dataset.random_crop; turn one of them off")

    # Scheduler / optimizer pairing.
    if sch.type == "adafactor" and opt.type != "Adafactor":
        err("scheduler.type", "the 'adafactor' scheduler only works with optimizer.type = 'Adafactor'; "
            "choose another scheduler or the Adafactor optimizer")
    if sch.type in ("constant", "adafactor") and sch.warmup_steps:
        # sd-scripts raises "does not require num_warmup_steps" for these two.
        err("scheduler.warmup_steps", f"the '{sch.type}' scheduler has no warmup (sd-scripts refuses it); set it to 0 "
            "or use 'constant_with_warmup'")
    if sch.type != "cosine_annealing_warm_restarts" and (sch.cycle_steps or sch.cycle_warmup_steps):
        warn("scheduler.cycle_steps", "only used by scheduler.type = 'cosine_annealing_warm_restarts'")

    # Network module / algo.
    if net.module == "networks.lora" and net.algo not in ("lora", "locon"):
        err("network.algo", f"networks.lora trains plain LoRA only; for '{net.algo}' use network.module = "
            "'lycoris.kohya'")
    if net.module == "networks.lora":
        lycoris_only = [name for name, default in _LYCORIS_ONLY_DEFAULTS.items() if getattr(net, name) != default]
        for name in lycoris_only:
            warn(f"network.{name}", "is a LyCORIS option; networks.lora ignores it (as sd-scripts does)")
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(net, name)
        if values is None:
            continue
        if net.module != "networks.lora":
            err(f"network.{name}", "is only used by network.module = 'networks.lora' (lycoris.kohya ignores it, "
                "as in sd-scripts); remove it or switch the module")
            continue
        expected = BLOCK_COUNTS[arch]
        if len(values) != expected:
            err(f"network.{name}", f"has {len(values)} values; {arch} with networks.lora needs exactly {expected} "
                "(IN blocks, MID, OUT blocks)")
    if net.block_alphas is not None and net.block_dims is None:
        err("network.block_alphas", "needs network.block_dims")
    if net.conv_block_alphas is not None and net.conv_block_dims is None:
        err("network.conv_block_alphas", "needs network.conv_block_dims")
    if net.train_unet_only and net.train_text_encoder_only:
        err("network.train_text_encoder_only", "cannot be combined with network.train_unet_only: nothing to train")
    if net.alpha > net.dim * 8:
        warn("network.alpha", f"alpha {net.alpha} is far above dim {net.dim}: the update is scaled by {net.alpha / net.dim:g}")
    if net.algo in ("ia3", "full") and net.use_tucker:
        warn("network.use_tucker", f"has no effect with algo '{net.algo}'")
    if net.algo == "lokr" and net.factor == 0:
        err("network.factor", "must be -1 (balanced) or a positive factor")
    for path, message in loader_gaps(net):  # tools that will not load the files (docs/spec.md, loaders)
        warn(path, message)
    if arch == "sdxl" and isinstance(opt.text_encoder_lr, list) and len(opt.text_encoder_lr) not in (1, 2):
        err("optimizer.text_encoder_lr", "SDXL takes one value or two ([te1, te2])")
    if arch != "sdxl" and isinstance(opt.text_encoder_lr, list) and len(opt.text_encoder_lr) != 1:
        err("optimizer.text_encoder_lr", f"{arch} has one text encoder: give one value")

    # Optimizer arguments: the names each class takes (the trainer builds the optimizer from the same table).
    for key in opt.args:
        problem = unknown_arg_message(opt.type, key)
        if problem is not None:
            err(f"optimizer.args.{key}", problem)
    # The polynomial schedule decays to 1e-7 (diffusers' lr_end); Adafactor with relative_step uses its own.
    if (sch.type == "polynomial" and opt.learning_rate <= 1e-7
            and not (opt.type == "Adafactor" and adafactor_relative_step(opt.args))):
        err("optimizer.learning_rate", "scheduler.type 'polynomial' decays to 1e-7: optimizer.learning_rate must be "
            "above that")

    # Optimizers with their own schedule / LR conventions.
    if opt.type in ("Prodigy", "DAdaptAdam") and (opt.unet_lr or opt.learning_rate) < 0.1:
        warn("optimizer.learning_rate", f"{opt.type} adapts the step size: a learning rate around 1.0 is usual")

    # Noise.
    if spec.noise.adaptive_noise_scale is not None and spec.noise.noise_offset is None:
        err("noise.adaptive_noise_scale", "needs noise.noise_offset (it is added to the offset, as in sd-scripts)")

    # Model.
    if spec.model.v_parameterization and arch != "sd2":
        warn("model.v_parameterization", f"v-prediction is meant for SD2.x 768-v models, not {arch} "
             "(sd-scripts warns too); make sure the base model was trained that way")
    if arch == "sd2" and spec.model.clip_skip is not None:
        warn("model.clip_skip", "SD2.x with clip_skip is unexpected (sd-scripts warns too); leave it unset")

    # Precision.
    if prec.full_fp16 and prec.mixed_precision != "fp16":
        err("precision.full_fp16", "needs precision.mixed_precision = 'fp16'")
    if prec.full_bf16 and prec.mixed_precision != "bf16":
        err("precision.full_bf16", "needs precision.mixed_precision = 'bf16'")
    if prec.full_fp16 and prec.full_bf16:
        err("precision.full_bf16", "choose one of full_fp16 / full_bf16")

    # Dataset geometry.
    w, h = ds.resolution_wh
    if w % 8 or h % 8:
        err("dataset.resolution", f"{w}x{h}: width and height must be multiples of 8")
    if ds.enable_bucket:
        if ds.min_bucket_reso > ds.max_bucket_reso:
            err("dataset.min_bucket_reso", "must not exceed dataset.max_bucket_reso")
        if ds.min_bucket_reso % ds.bucket_reso_steps or ds.max_bucket_reso % ds.bucket_reso_steps:
            warn("dataset.bucket_reso_steps", "min/max_bucket_reso are not multiples of bucket_reso_steps; "
                 "sd-scripts rounds them down")
        if min(w, h) < ds.min_bucket_reso:
            err("dataset.min_bucket_reso", f"is above the resolution {w}x{h}; lower it")
        if max(w, h) > ds.max_bucket_reso:
            err("dataset.max_bucket_reso", f"is below the resolution {w}x{h}; raise it")
    for path, message in dataset_spec_problems(ds):  # the dataset layout's own rules, before any listing
        err(path, message)
    if ds.config_toml is not None and ds.subsets is not None:
        err("dataset.subsets", "give either dataset.config_toml or dataset.subsets, not both")
    if ds.keep_tokens and not any_shuffle:
        warn("dataset.keep_tokens", "only matters with shuffle_caption or caption tag dropout")
    if arch == "sdxl" and spec.model.clip_skip not in (None, 1, 2):
        warn("model.clip_skip", "SDXL uses the penultimate layers by construction; clip_skip is ignored")
    step_multiple = BUCKET_STEP_MULTIPLE[arch]
    if ds.enable_bucket and ds.bucket_reso_steps % step_multiple:
        warn("dataset.bucket_reso_steps", f"sd-scripts refuses values that are not multiples of {step_multiple} for "
             f"{arch}; Lathe accepts them, but files trained so are not reproducible with sd-scripts")

    # Training length.
    if tr.min_timestep >= tr.max_timestep:
        err("training.min_timestep", "must be below training.max_timestep")
    if tr.max_train_steps is not None and tr.max_train_epochs is not None:
        warn("training.max_train_steps", "ignored: training.max_train_epochs wins (as in sd-scripts)")

    # Saving.
    if sv.save_last_n_epochs and not sv.save_every_n_epochs:
        err("save.save_last_n_epochs", "needs save.save_every_n_epochs")
    if sv.save_last_n_steps and not sv.save_every_n_steps:
        err("save.save_last_n_steps", "needs save.save_every_n_steps")
    if sv.save_precision == "fp16":
        warn("save.save_precision", "fp16 can underflow small weights to zero; the run reports all-zero tensors")

    # Shrink.
    if sh.enabled:
        if sh.rank is not None and sh.method is not None:
            err("shrink.rank", "give either shrink.rank or shrink.method/param, not both")
        if sh.method is not None and sh.param is None:
            err("shrink.param", f"shrink.method '{sh.method}' needs shrink.param")
        if sh.method == "sv_ratio" and sh.param is not None and sh.param < 1:
            err("shrink.param", "sv_ratio needs a ratio ≥ 1 (largest / smallest kept singular value)")
        if sh.method in ("sv_fro", "sv_cumulative") and sh.param is not None and sh.param > 1:
            err("shrink.param", f"{sh.method} needs a fraction in (0, 1]")
        if sh.param is not None and sh.method is None:
            err("shrink.param", "is only used with shrink.method (sv_ratio, sv_fro or sv_cumulative); set one or remove "
                "shrink.param")
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

    # Samples.
    for i, line in enumerate(spec.sample.prompts):
        try:
            parsed = parse_sample_prompt(line)
        except ValueError as exc:
            err(f"sample.prompts[{i}]", str(exc))
            continue
        if not parsed["prompt"]:
            err(f"sample.prompts[{i}]", "empty prompt")
        if parsed["width"] % 8 or parsed["height"] % 8 or not (64 <= parsed["width"] <= 4096) or not (64 <= parsed["height"] <= 4096):
            err(f"sample.prompts[{i}]", "--w/--h must be multiples of 8 between 64 and 4096")
    if spec.sample.prompts and not (spec.sample.every_n_steps or spec.sample.every_n_epochs or spec.sample.at_first):
        warn("sample.prompts", "no sample.every_n_steps / every_n_epochs / at_first: only final samples are made")

    # Resources.
    if spec.resources.nodes > 1 and spec.resources.gpus < 1:
        err("resources.nodes", "multi-node training needs resources.gpus ≥ 1 per node")
    res = spec.resources
    if res.memory is not None and _bytes(res.shm_size) >= _bytes(res.memory):
        # /dev/shm is a memory-backed emptyDir: what it holds counts toward the pod's memory limit.
        err("resources.shm_size", f"{res.shm_size} is not below resources.memory ({res.memory}); shared memory "
            "counts toward the memory limit, so a full /dev/shm would OOM-kill the trainer: lower shm_size "
            "or raise memory")
    if prec.torch_compile is True and spec.resources.gpus < 1:
        warn("precision.torch_compile", "on CPU the first steps compile for many minutes (inductor builds C++), and "
             "again for each bucket shape; it is meant for GPUs (set resources.gpus, or turn it off)")
    return out


def check_kind(spec: JobSpec) -> list[Problem]:
    """The sections each job kind needs; the training checks run only for kind "train"."""
    problems = []
    if spec.model is None and spec.kind != "caption":
        problems.append(Problem("model", f"is missing: required for kind \"{spec.kind}\" (model.uri, the base model)"))
    if spec.kind == "caption":
        problems += _caption_problems(spec)
    elif spec.caption is not None:
        problems.append(Problem("caption", "only for kind \"caption\"; remove it or set kind = \"caption\""))
    if spec.kind in ("train", "caption"):
        if spec.dataset is None:
            problems.append(Problem("dataset", f"is missing: kind \"{spec.kind}\" needs dataset.uri (a folder "
                                    "of images)" + (", or set kind to \"merge\" or \"shrink\"" if spec.kind == "train" else "")))
    elif spec.dataset is not None:
        problems.append(Problem("dataset", f"a \"{spec.kind}\" job reads no dataset; remove this section"))
    if spec.kind == "merge" and spec.merge is None:
        problems.append(Problem("merge", "required for kind \"merge\": give merge.adapters = [{uri, ratio}, …]"))
    if spec.kind != "merge" and spec.merge is not None:
        problems.append(Problem("merge", "only for kind \"merge\"; remove it or set kind = \"merge\""))
    if spec.kind == "shrink" and spec.shrink.adapter is None:
        problems.append(Problem("shrink.adapter", "required for kind \"shrink\": the URI of the adapter file to reduce"))
    if spec.kind != "shrink" and spec.shrink.adapter is not None:
        problems.append(Problem("shrink.adapter", "only for kind \"shrink\" (a training job shrinks its own adapter)"))
    problems += _check_grid(spec)
    if spec.kind == "shrink" and not spec.shrink.enabled:
        problems.append(Problem("shrink.enabled", "a \"shrink\" job with shrink.enabled = false would do nothing"))
    return problems


def _caption_problems(spec: JobSpec) -> list[Problem]:
    c = spec.caption
    if c is None:
        return [Problem("caption", "required for kind \"caption\": the tagger options and/or tag operations "
                        "(an empty section tags with the defaults)")]
    problems = []
    if spec.model is None and not (c.replace or c.remove or c.add or c.min_count or c.dedupe or c.trigger_word
                                   or c.remove_orphans):
        problems.append(Problem("caption", "no tagger (model.uri) and no tag operation: the job would copy the "
                                "dataset unchanged; give model.uri or an operation (remove, add, replace, …)"))
    for old, new in c.replace.items():
        if not old.strip() or not new.strip():
            problems.append(Problem("caption.replace", f"{old!r} → {new!r}: both tags must be non-empty"))
    if c.min_length > c.max_length:
        problems.append(Problem("caption.min_length", f"{c.min_length} is above caption.max_length {c.max_length}"))
    if not c.caption_extension.startswith("."):
        problems.append(Problem("caption.caption_extension", f"must start with '.', got {c.caption_extension!r}"))
    if spec.dataset is not None and (spec.dataset.uri.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz"))):
        problems.append(Problem("dataset.uri", "a caption job reads a folder of images; extract the archive "
                                "to a folder first"))
    return problems


def _check_grid(spec: JobSpec) -> list[Problem]:
    problems = []
    if spec.kind != "grid":
        if spec.grid is not None:
            problems.append(Problem("grid", "only for kind \"grid\" (a training job renders its own grid with "
                                    "sample.grid)"))
    elif spec.grid is None:
        problems.append(Problem("grid", "required for kind \"grid\": give grid.adapters, grid.prompts and the axes"))
    sample_grid = spec.sample.grid
    if sample_grid is not None and spec.kind != "train":
        problems.append(Problem("sample.grid", "only for kind \"train\"; a \"grid\" job takes the grid section"))
    if sample_grid is not None and "saves" not in (sample_grid.x, sample_grid.y):
        problems.append(Problem("sample.grid", "a training job's grid is over its saves: set x or y to \"saves\""))
    if sample_grid is not None and not spec.sample.prompts:
        problems.append(Problem("sample.grid", "needs sample.prompts: the grid renders them over the saves"))
    for where, g in (("grid", spec.grid if spec.kind == "grid" else None), ("sample.grid", sample_grid)):
        if g is None:
            continue
        if g.x == g.y:
            problems.append(Problem(f"{where}.y", f"is the same axis as {where}.x ({g.x!r}); pick two of "
                                    "saves, weight, seed"))
        if "seed" in (g.x, g.y) and not g.seeds:
            problems.append(Problem(f"{where}.seeds", "required when seed is an axis: give the seeds to compare"))
        if "weight" not in (g.x, g.y) and len(g.weights) != 1:
            problems.append(Problem(f"{where}.weights", "several weights but weight is not an axis; set x or y to "
                                    "\"weight\" or give one weight"))
        if "seed" not in (g.x, g.y) and len(g.seeds) > 1:
            problems.append(Problem(f"{where}.seeds", "several seeds but seed is not an axis; set x or y to "
                                    "\"seed\" or give one seed"))
    g = spec.grid if spec.kind == "grid" else None
    if g is not None:
        if not g.adapters:
            problems.append(Problem("grid.adapters", "required: the finished jobs ({job = ID}) or adapter files "
                                    "({uri = …}) to compare"))
        if not g.prompts:
            problems.append(Problem("grid.prompts", "required: one or more prompts in the sample.prompts syntax"))
        for i, a in enumerate(g.adapters):
            if (a.uri is None) == (a.job is None):
                problems.append(Problem(f"grid.adapters[{i}]", "give exactly one of uri (an adapter file) or job "
                                        "(a finished job's id)"))
        if "saves" not in (g.x, g.y) and len(g.adapters) != 1:
            problems.append(Problem("grid.adapters", "several adapters but saves is not an axis; set x or y to "
                                    "\"saves\" or give one adapter"))
        for i, line in enumerate(g.prompts):
            try:
                parsed = parse_sample_prompt(line)
            except ValueError as exc:
                problems.append(Problem(f"grid.prompts[{i}]", str(exc)))
                continue
            if not parsed["prompt"]:
                problems.append(Problem(f"grid.prompts[{i}]", "empty prompt"))
            if parsed["width"] % 8 or parsed["height"] % 8 or not (64 <= parsed["width"] <= 4096) or \
                    not (64 <= parsed["height"] <= 4096):
                problems.append(Problem(f"grid.prompts[{i}]", "--w/--h must be multiples of 8 between 64 and 4096"))
    return problems


def warnings_for(spec: JobSpec) -> list[Problem]:
    return [p for p in check_spec(spec) if p.severity == "warning"]
