"""`python -m trainer from-kohya FILE`: an sd-scripts command line or config file → a JobSpec.

Input is either a shell script (bash or PowerShell) that runs `train_network.py` / `sdxl_train_network.py`,
usually through `accelerate launch`, or an sd-scripts `--config_file` TOML (flat keys named like the flags;
sections are ignored, as sd-scripts does). The JobSpec is printed as JSON on stdout alone; every flag
that was not mapped, or that sd-scripts itself ignores for the chosen network module, is listed on
stderr with the reason. Paths are kept as given (local or s3://); a local `--dataset_config` and a local
`.txt` `--sample_prompts` file are read and inlined, since the job cannot reach the user's disk.

Exit codes: 0 a spec was produced (it passed decode and check); 2 none could be (reasons on stderr).
Torch-free, like `trainer.core.spec`.
"""

from __future__ import annotations

import ast
import math
import os
import posixpath
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args


from trainer.core.images import IMAGE_EXTENSIONS
from trainer.core.precision import canonical_precision
from trainer.core.spec import (
    Algo,
    DynamoBackend,
    JobSpec,
    OptimizerType,
    Preset,
    SpecError,
    encode_spec,
    spec_from_obj,
    warnings_for,
)

TRAINING_SCRIPTS = {"train_network.py": "sd", "sdxl_train_network.py": "sdxl"}
OTHER_SD_SCRIPTS = ("train_db.py", "fine_tune.py", "sdxl_train.py", "train_textual_inversion.py",
                    "sdxl_train_textual_inversion.py", "train_controlnet.py")

# sd-scripts flags that take no value (argparse store_true).
BOOL_FLAGS = frozenset("""
v2 v_parameterization lowram highvram no_half_vae shuffle_caption color_aug flip_aug random_crop enable_bucket
bucket_no_upscale cache_latents cache_latents_to_disk cache_text_encoder_outputs cache_text_encoder_outputs_to_disk
gradient_checkpointing full_fp16 full_bf16 fp8_base fp8_base_unet xformers sdpa mem_eff_attn
persistent_data_loader_workers network_train_unet_only network_train_text_encoder_only save_state
save_state_on_train_end sample_at_first debug_dataset noise_offset_random_strength ip_noise_gamma_random_strength
zero_terminal_snr torch_compile use_8bit_adam use_lion_optimizer dim_from_weights no_metadata cache_info
enable_wildcard alpha_mask masked_loss log_config output_config skip_until_initial_step fused_backward_pass
use_safetensors scale_v_pred_loss_like_noise_pred debiased_estimation_loss weighted_captions
ddp_gradient_as_bucket_view ddp_static_graph save_state_to_huggingface resume_from_huggingface async_upload
disable_mmap_load_safetensors cpu_offload_checkpointing skip_cache_check deepspeed
""".split())
# sd-scripts flags that take several values (argparse nargs="*").
MULTI_FLAGS = frozenset("network_args optimizer_args lr_scheduler_args text_encoder_lr base_weights "
                        "base_weights_multiplier".split())
# accelerate launch / torchrun options that take no value.
LAUNCHER_BOOL_FLAGS = frozenset("multi_gpu cpu use_deepspeed use_fsdp use_megatron_lm same_network "
                                "no_python module quiet debug tpu standalone".split())

# Flags mapped one to one: flag → (field path, value kind).
SIMPLE_FLAGS: dict[str, tuple[str, str]] = {
    "pretrained_model_name_or_path": ("model.uri", "str"),
    "v_parameterization": ("model.v_parameterization", "bool"),
    "vae": ("model.vae", "str"),
    "clip_skip": ("model.clip_skip", "int"),
    "no_half_vae": ("model.no_half_vae", "bool"),
    "lowram": ("model.lowram", "bool"),
    "train_data_dir": ("dataset.uri", "str"),
    "reg_data_dir": ("dataset.reg_uri", "str"),
    "caption_extension": ("dataset.caption_extension", "str"),
    "caption_extention": ("dataset.caption_extension", "str"),  # sd-scripts keeps the old misspelling
    "enable_bucket": ("dataset.enable_bucket", "bool"),
    "min_bucket_reso": ("dataset.min_bucket_reso", "int"),
    "max_bucket_reso": ("dataset.max_bucket_reso", "int"),
    "bucket_reso_steps": ("dataset.bucket_reso_steps", "int"),
    "bucket_no_upscale": ("dataset.bucket_no_upscale", "bool"),
    "shuffle_caption": ("dataset.shuffle_caption", "bool"),
    "keep_tokens": ("dataset.keep_tokens", "int"),
    "caption_separator": ("dataset.caption_separator", "str"),
    "flip_aug": ("dataset.flip_aug", "bool"),
    "color_aug": ("dataset.color_aug", "bool"),
    "random_crop": ("dataset.random_crop", "bool"),
    "caption_dropout_rate": ("dataset.caption_dropout_rate", "float"),
    "caption_dropout_every_n_epochs": ("dataset.caption_dropout_every_n_epochs", "int"),
    "caption_tag_dropout_rate": ("dataset.caption_tag_dropout_rate", "float"),
    "max_token_length": ("dataset.max_token_length", "int"),
    "dataset_repeats": ("dataset.dataset_repeats", "int"),
    "prior_loss_weight": ("dataset.prior_loss_weight", "float"),
    "max_data_loader_n_workers": ("dataset.max_data_loader_n_workers", "int"),
    "persistent_data_loader_workers": ("dataset.persistent_data_loader_workers", "bool"),
    "network_dim": ("network.dim", "int"),
    "network_weights": ("network.weights", "str"),
    "network_train_unet_only": ("network.train_unet_only", "bool"),
    "network_train_text_encoder_only": ("network.train_text_encoder_only", "bool"),
    "learning_rate": ("optimizer.learning_rate", "float"),
    "unet_lr": ("optimizer.unet_lr", "float"),
    "max_grad_norm": ("optimizer.max_grad_norm", "float"),
    "scale_weight_norms": ("optimizer.scale_weight_norms", "float"),
    "lr_scheduler_num_cycles": ("scheduler.num_cycles", "int"),
    "lr_scheduler_power": ("scheduler.power", "float"),
    "max_train_steps": ("training.max_train_steps", "int"),
    "max_train_epochs": ("training.max_train_epochs", "int"),
    "train_batch_size": ("training.batch_size", "int"),
    "gradient_accumulation_steps": ("training.gradient_accumulation_steps", "int"),
    "gradient_checkpointing": ("training.gradient_checkpointing", "bool"),
    "seed": ("training.seed", "int"),
    "min_snr_gamma": ("training.min_snr_gamma", "float"),
    "min_timestep": ("training.min_timestep", "int"),
    "max_timestep": ("training.max_timestep", "int"),
    "noise_offset": ("noise.noise_offset", "float"),
    "adaptive_noise_scale": ("noise.adaptive_noise_scale", "float"),
    "multires_noise_iterations": ("noise.multires_noise_iterations", "int"),
    "multires_noise_discount": ("noise.multires_noise_discount", "float"),
    "mixed_precision": ("precision.mixed_precision", "str"),
    "full_fp16": ("precision.full_fp16", "bool"),
    "full_bf16": ("precision.full_bf16", "bool"),
    "cache_latents": ("precision.cache_latents", "bool"),
    "cache_latents_to_disk": ("precision.cache_latents_to_disk", "bool"),
    "cache_text_encoder_outputs": ("precision.cache_text_encoder_outputs", "bool"),
    "cache_text_encoder_outputs_to_disk": ("precision.cache_text_encoder_outputs_to_disk", "bool"),
    "vae_batch_size": ("precision.vae_batch_size", "int"),
    "torch_compile": ("precision.torch_compile", "bool"),
    "output_dir": ("save.output_uri", "str"),
    "output_name": ("save.output_name", "str"),
    "save_every_n_epochs": ("save.save_every_n_epochs", "int"),
    "save_every_n_steps": ("save.save_every_n_steps", "int"),
    "save_last_n_epochs": ("save.save_last_n_epochs", "int"),
    "save_last_n_steps": ("save.save_last_n_steps", "int"),
    "training_comment": ("save.training_comment", "str"),
    "metadata_title": ("save.title", "str"),
    "metadata_author": ("save.author", "str"),
    "metadata_description": ("save.description", "str"),
    "metadata_license": ("save.license", "str"),
    "metadata_tags": ("save.tags", "str"),
    "sample_sampler": ("sample.sampler", "str"),
    "sample_every_n_steps": ("sample.every_n_steps", "int"),
    "sample_every_n_epochs": ("sample.every_n_epochs", "int"),
    "sample_at_first": ("sample.at_first", "bool"),
    "log_prefix": ("logging.log_prefix", "str"),
}

# Flags handled by their own code below (listed so the "not mapped" pass skips them).
SPECIAL_FLAGS = frozenset("""
v2 resolution network_module network_alpha network_dropout network_args optimizer_type use_8bit_adam
use_lion_optimizer optimizer_args text_encoder_lr lr_scheduler lr_scheduler_type lr_scheduler_args lr_warmup_steps
save_precision save_model_as save_state sample_prompts xformers sdpa mem_eff_attn log_with logging_dir
dataset_config config_file dynamo_backend
""".split())

# Flags with no Lathe field, and why.
IGNORED_FLAGS: dict[str, str] = {
    "num_cpu_threads_per_process": "Lathe sets CPU threads per process itself",
    "highvram": "a local VRAM heuristic; Lathe manages device memory itself",
    "tokenizer_cache_dir": "the tokenizer comes with the base model; no hub access from a job",
    "debug_dataset": "interactive dataset viewer; not available in a job",
    "cache_info": "a local speed-up of dataset scanning; not needed",
    "save_state_on_train_end": "Lathe always keeps resumable checkpoints (save.checkpoint_every_n_steps)",
    "resume": "Lathe resumes from its own checkpoints in the job directory",
    "save_last_n_epochs_state": "use save.keep_checkpoints to bound resumable checkpoints",
    "save_last_n_steps_state": "use save.keep_checkpoints to bound resumable checkpoints",
    "output_config": "writes a config file instead of training",
    "log_tracker_name": "Lathe logs to TensorBoard in the job directory",
    "log_tracker_config": "Lathe logs to TensorBoard in the job directory",
    "log_config": "the whole spec is recorded in the run's metadata",
    "wandb_run_name": "WandB is not available (no outbound network from a job)",
    "wandb_api_key": "WandB is not available (no outbound network from a job); never put keys in a spec",
    "huggingface_repo_id": "uploading to the Hugging Face hub is not available; results go to the output URI",
    "huggingface_repo_type": "uploading to the Hugging Face hub is not available",
    "huggingface_path_in_repo": "uploading to the Hugging Face hub is not available",
    "huggingface_token": "uploading to the Hugging Face hub is not available; never put tokens in a spec",
    "huggingface_repo_visibility": "uploading to the Hugging Face hub is not available",
    "save_state_to_huggingface": "uploading to the Hugging Face hub is not available",
    "resume_from_huggingface": "uploading to the Hugging Face hub is not available",
    "async_upload": "uploading to the Hugging Face hub is not available",
    "use_safetensors": "Lathe always saves .safetensors",
    "no_metadata": "Lathe always writes sd-scripts' metadata (tools rely on it)",
    "ddp_timeout": "Lathe configures distributed training itself",
    "ddp_gradient_as_bucket_view": "Lathe configures distributed training itself",
    "ddp_static_graph": "Lathe configures distributed training itself",
}

LYCORIS_ONLY_NETWORK_ARGS = ("algo", "preset", "use_tucker", "use_scalar", "rank_dropout_scale", "train_norm",
                             "factor", "decompose_both", "block_size")
BLOCK_NETWORK_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
TUCKER_ALIASES = ("use_cp", "use_conv_cp")  # LyCORIS' deprecated names for use_tucker


class _Unresolved(str):
    """A shell variable whose value could not be worked out (kept as text, reported when used)."""


class Conversion:
    """Collects the JobSpec object being built and the notes that explain what was not mapped."""

    def __init__(self, base_dir: Path, *, local_files: bool = True) -> None:
        self.obj: dict[str, Any] = {"version": 1}
        self.notes: list[str] = []
        self.base_dir = base_dir
        self.local_files = local_files  # False on a server: no path in the text may reach its disk

    def note(self, flag: str, reason: str) -> None:
        self.notes.append(f"{flag}: {reason}" if flag else reason)

    def set(self, path: str, value: Any) -> None:
        *parents, leaf = path.split(".")
        node = self.obj
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.obj
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def local_path(self, given: str) -> Path | None:
        """The local file a path in the script refers to, relative paths taken from the script's folder."""
        if "://" in given or not self.local_files:
            return None
        path = Path(os.path.expanduser(given))
        return path if path.is_absolute() else self.base_dir / path


# ---------------------------------------------------------------------------------------------
# Reading a shell script


_BASH_ASSIGN = re.compile(r"^(?:export\s+|local\s+|declare\s+(?:-\w+\s+)?)?([A-Za-z_]\w*)=(.*)$")
_PS_ASSIGN = re.compile(r"^\$([A-Za-z_]\w*)\s*=\s*(.*)$")
_VAR_REF = re.compile(r"\$\{([A-Za-z_]\w*)(\[@\]|\[\*\])?\}|\$(?:env:)?([A-Za-z_]\w*)")


def _logical_lines(text: str) -> list[str]:
    """Lines with bash (`\\`), PowerShell (`` ` ``) and cmd (`^`) continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = raw.rstrip()
        if stripped.endswith(("\\", "`", "^")) and not stripped.endswith(("\\\\", "``")):
            pending += stripped[:-1] + " "
            continue
        out.append(pending + stripped)
        pending = ""
    if pending:
        out.append(pending)
    return out


class _Script:
    """Variables, arrays and the training command of a shell script."""

    def __init__(self, text: str, conv: Conversion) -> None:
        self.conv = conv
        self.powershell = bool(re.search(r"^\s*\$[A-Za-z_]\w*\s*=", text, re.M)) or "`\n" in text
        self.vars: dict[str, str] = {}
        self.arrays: dict[str, list[str]] = {}
        self.command: list[str] | None = None
        self.unresolved_used: set[str] = set()
        self._read(text)

    def _key(self, name: str) -> str:
        return name.lower() if self.powershell else name  # PowerShell variable names ignore case

    def _split(self, text: str) -> list[str]:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        if self.powershell:
            lexer.escape = ""  # backslashes are path separators in PowerShell, not escapes
        return list(lexer)

    def expand(self, text: str) -> str:
        """Substitute variables set earlier in the script; unknown ones stay and are reported once."""

        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(3)
            key = self._key(name)
            if m.group(2):  # "${args[@]}"
                if key in self.arrays:
                    return " ".join(shlex.quote(t) for t in self.arrays[key])
            elif key in self.vars and not isinstance(self.vars[key], _Unresolved):
                return self.vars[key]
            self.unresolved_used.add(name)
            return m.group(0)

        # Expand "${arr[@]}" outside of double quotes so each element stays one word.
        text = re.sub(r'"(\$\{[A-Za-z_]\w*\[[@*]\]\})"', r"\1", text)
        return _VAR_REF.sub(sub, text)

    def _read(self, text: str) -> None:
        lines = _logical_lines(text)
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line or line.startswith(("#", "REM ", "rem ", "::")):
                continue
            m = _BASH_ASSIGN.match(line) or _PS_ASSIGN.match(line)
            if m and not line.startswith(("--", "accelerate", "python")):
                name, value = m.group(1), m.group(2).strip()
                if value.startswith("(") and not self.powershell:  # bash array: NAME=( ... )
                    body = value[1:]
                    while ")" not in _strip_comment(body) and i < len(lines):
                        body += "\n" + lines[i]
                        i += 1
                    body = _strip_comment_lines(body).rsplit(")", 1)[0]
                    self.arrays[self._key(name)] = self._split(self.expand(body))
                    continue
                self.vars[self._key(name)] = self._value(value)
                continue
            if self.command is None and _script_index(self._split_safe(line)) is not None:
                self.command = self._split_safe(self.expand(line))
            elif self.command is not None and _script_index(self._split_safe(line)) is not None:
                self.conv.note("", f"a second training command was found and ignored: {line[:80]}")

    def _split_safe(self, line: str) -> list[str]:
        try:
            return self._split(line)
        except ValueError:  # unbalanced quotes
            return line.split()

    def _value(self, raw: str) -> str:
        expanded = self.expand(raw)
        try:
            words = self._split(expanded)
        except ValueError:
            return _Unresolved(raw)
        if len(words) == 1 and "$" not in words[0]:
            return words[0]
        if not words:
            return ""
        return _Unresolved(raw)  # arithmetic, command substitution, several words…


def _strip_comment(text: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", text, flags=re.M)


def _strip_comment_lines(text: str) -> str:
    return "\n".join(_strip_comment(line) for line in text.split("\n"))


def _script_name(token: str) -> str:
    return posixpath.basename(token.replace("\\", "/"))


def _script_index(tokens: list[str]) -> int | None:
    for i, token in enumerate(tokens):
        name = _script_name(token)
        if name in TRAINING_SCRIPTS or name in OTHER_SD_SCRIPTS:
            return i
    return None


def _parse_flags(tokens: list[str], bool_flags: frozenset[str], multi_flags: frozenset[str],
                 conv: Conversion, where: str) -> dict[str, Any]:
    """argparse's reading of `--flag=value`, `--flag value`, `--flag v1 v2 …` and store_true flags."""
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--"):
            conv.note(token, f"unexpected word in the {where} (not a --flag); ignored")
            continue
        name, eq, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            flags[name] = [inline] if name in multi_flags else inline
            continue
        if name in bool_flags:
            flags[name] = True
            continue
        values: list[str] = []
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
            if name not in multi_flags:
                break
        if name in multi_flags:
            flags[name] = values
        elif values:
            flags[name] = values[0]
        else:
            flags[name] = True  # an unknown switch
    return flags


# ---------------------------------------------------------------------------------------------
# Values


def _map_dynamo_backend(conv: Conversion, raw: Any) -> None:
    """--dynamo_backend: the backends stock PyTorch has; sd-scripts' others need packages Lathe lacks."""
    value = _typed(conv, "dynamo_backend", raw, "str")
    if value is None:
        return
    supported = get_args(DynamoBackend)
    if value.lower() in supported:
        conv.set("precision.dynamo_backend", value.lower())
    else:
        conv.note("--dynamo_backend", f"{value!r} is not available in Lathe's trainer image; left out (the default "
                  f"is inductor; choose one of {', '.join(supported)})")


def _typed(conv: Conversion, flag: str, raw: Any, kind: str) -> Any:
    """A flag's value as `kind`; None (and a note) when it does not read as one."""
    if isinstance(raw, str) and _VAR_REF.search(raw):
        conv.note(f"--{flag}", f"value {raw!r} uses a shell variable that could not be resolved (not a simple "
                  "assignment in the script); left out — set it in the spec by hand")
        return None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
    elif kind == "str":
        if isinstance(raw, str):
            return raw
        if not isinstance(raw, (list, dict, bool)):
            return str(raw)
    elif kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        try:
            value = float(str(raw))
            if value.is_integer():
                return int(value)
        except ValueError:
            pass
    elif kind == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            value = float(str(raw))
            if math.isfinite(value):
                return value
        except ValueError:
            pass
    conv.note(f"--{flag}", f"{raw!r} is not a valid {kind}; left out")
    return None


def _literal(text: str) -> Any:
    """A `key=value` argument value as sd-scripts reads optimizer args (Python literal), lists for tuples."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        raise
    if isinstance(value, tuple):
        value = list(value)
    return value


def _key_values(conv: Conversion, flag: str, items: Any) -> list[tuple[str, str]]:
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        conv.note(f"--{flag}", f"expected key=value items, got {items!r}; left out")
        return []
    out = []
    for item in items:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            conv.note(f"--{flag}", f"'{item}' is not key=value; left out")
            continue
        out.append((key.strip(), value.strip()))
    return out


def _ci_choice(value: str, choices: tuple[str, ...]) -> str | None:
    for choice in choices:
        if choice.lower() == value.lower():
            return choice
    return None


# ---------------------------------------------------------------------------------------------
# Mapping


def _map_flags(conv: Conversion, flags: dict[str, Any], arch: str) -> bool:
    """Fill conv.obj from sd-scripts flags. False when the command asks for something Lathe cannot do."""
    ok = _map_arch(conv, flags, arch)
    module = _map_network_module(conv, flags)
    if module is None:
        ok = False
        module = "lycoris.kohya"
    _map_simple_flags(conv, flags)
    if "resolution" in flags:
        _map_resolution(conv, flags["resolution"])
    if "dynamo_backend" in flags:
        _map_dynamo_backend(conv, flags["dynamo_backend"])
    _map_network_flags(conv, flags, module)
    ok = _map_optimizer(conv, flags) and ok
    _map_scheduler(conv, flags)
    _map_precision_and_save(conv, flags)
    _map_samples_and_logging(conv, flags)
    if "dataset_config" in flags:
        _map_dataset_config(conv, flags)
    if flags.get("save_state"):
        _map_save_state(conv, flags)
    if conv.get("save.output_name") and "name" not in conv.obj:
        conv.set("name", conv.get("save.output_name"))
    return ok


def _map_arch(conv: Conversion, flags: dict[str, Any], arch: str) -> bool:
    """model.arch from the script and --v2; False for --v2 with the SDXL script."""
    if arch == "sdxl":
        conv.set("model.arch", "sdxl")
        if flags.get("v2") is True:
            conv.note("--v2", "sdxl_train_network.py refuses --v2 (it is an SD2.x switch); remove it")
            return False
    elif _typed(conv, "v2", flags["v2"], "bool") if "v2" in flags else False:
        conv.set("model.arch", "sd2")
    else:
        conv.set("model.arch", "sd1")
    return True


def _map_simple_flags(conv: Conversion, flags: dict[str, Any]) -> None:
    """The one-to-one flags; a note for each flag that is ignored or has no equivalent."""
    for flag, raw in flags.items():
        if flag in SIMPLE_FLAGS:
            path, kind = SIMPLE_FLAGS[flag]
            value = _typed(conv, flag, raw, kind)
            if value is None or (kind == "bool" and value is False):
                continue
            conv.set(path, value)
        elif flag in SPECIAL_FLAGS:
            continue
        elif flag in IGNORED_FLAGS:
            conv.note(f"--{flag}", f"not mapped: {IGNORED_FLAGS[flag]}")
        else:
            conv.note(f"--{flag}", "not mapped: Lathe has no equivalent option")


def _map_network_flags(conv: Conversion, flags: dict[str, Any], module: str) -> None:
    """--network_alpha, --network_dropout and --network_args for the chosen module."""
    if "network_alpha" in flags:
        alpha = _typed(conv, "network_alpha", flags["network_alpha"], "float")
        if alpha == 0:
            dim = conv.get("network.dim", 4)
            conv.note("--network_alpha", f"0 means 'no scaling' in sd-scripts (alpha = dim); written as {dim}")
            alpha = float(dim)
        if alpha is not None:
            conv.set("network.alpha", alpha)
    if "network_dropout" in flags:
        value = _typed(conv, "network_dropout", flags["network_dropout"], "float")
        if module == "lycoris.kohya":
            conv.note("--network_dropout", "ignored: lycoris.kohya does not read it (as in sd-scripts); its neuron "
                      "dropout is the network_args 'dropout=' value (network.dropout)")
        elif value:
            conv.set("network.dropout", value)
    if "network_args" in flags:
        _map_network_args(conv, flags["network_args"], module)


def _map_network_module(conv: Conversion, flags: dict[str, Any]) -> str | None:
    raw = flags.get("network_module")
    if raw is None:
        conv.note("--network_module", "not given; sd-scripts needs one — using networks.lora")
        conv.set("network.module", "networks.lora")
        return "networks.lora"
    name = str(raw)
    if name in ("networks.lora", "lycoris.kohya"):
        conv.set("network.module", name)
        return name
    if name == "locon.locon_kohya":
        conv.note("--network_module", "locon.locon_kohya (the old LoCon package) is trained as lycoris.kohya "
                  "algo=locon, which writes the same keys")
        conv.set("network.module", "lycoris.kohya")
        conv.set("network.algo", "locon")
        return "lycoris.kohya"
    if name == "networks.dylora":
        conv.note("--network_module", "networks.dylora is trained as lycoris.kohya algo=dylora (network_args "
                  "'unit' becomes network.block_size); its file reads like sd-scripts' DyLoRA (LoRA keys, the full "
                  "rank as trained), but training scales the blocks in use by alpha/(blocks in use) where sd-scripts "
                  "uses alpha/dim·√(dim/(rank + unit))")
        conv.set("network.module", "lycoris.kohya")
        conv.set("network.algo", "dylora")
        return "lycoris.kohya"
    conv.note("--network_module", f"'{name}' is not supported; use networks.lora or lycoris.kohya")
    return None


def _map_resolution(conv: Conversion, raw: Any) -> None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        conv.set("dataset.resolution", raw)
        return
    if isinstance(raw, list) and len(raw) == 2:
        raw = f"{raw[0]},{raw[1]}"
    parts = [p.strip() for p in str(raw).replace("x", ",").split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1 or (len(sizes) == 2 and sizes[0] == sizes[1]):
        conv.set("dataset.resolution", sizes[0])
    elif len(sizes) == 2:
        conv.set("dataset.resolution", sizes)
    else:
        conv.note("--resolution", f"{raw!r} is not 'size' or 'width,height'; left out")


def _map_network_args(conv: Conversion, items: Any, module: str) -> None:
    for key, value in _key_values(conv, "network_args", items):
        flag = f"--network_args {key}"
        if key in TUCKER_ALIASES:
            conv.note(flag, "deprecated LyCORIS name; mapped to network.use_tucker")
            key = "use_tucker"
        if key in BLOCK_NETWORK_ARGS:
            _map_block_arg(conv, flag, key, value, module)
        elif key in LYCORIS_ONLY_NETWORK_ARGS and module != "lycoris.kohya":
            conv.note(flag, "ignored: networks.lora does not read it (as in sd-scripts)")
        else:
            _map_network_arg(conv, flag, key, value, module)


def _map_block_arg(conv: Conversion, flag: str, key: str, value: str, module: str) -> None:
    """block_dims / block_alphas / conv_block_*: comma-separated numbers, read by networks.lora only."""
    if module != "networks.lora":
        count = len([v for v in value.split(",") if v.strip()])
        conv.note(flag, f"ignored: {module} does not read it (sd-scripts passes it on, LyCORIS ignores it); "
                  f"{count} values given")
        return
    kind = "int" if key.endswith("dims") else "float"
    try:
        numbers = [int(v) if kind == "int" else float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        conv.note(flag, f"'{value}' is not a comma-separated list of numbers; left out")
        return
    conv.set(f"network.{key}", numbers)


def _map_network_arg(conv: Conversion, flag: str, key: str, value: str, module: str) -> None:
    """One network_args option other than the block lists, mapped onto its network.* field."""
    if key == "algo":
        algo = value.lower().replace("_", "-")
        if algo not in get_args(Algo):
            conv.note(flag, f"'{value}' is not a supported algo ({', '.join(get_args(Algo))}); left out")
            return
        conv.set("network.algo", algo)
    elif key == "preset":
        if value not in get_args(Preset):
            conv.note(flag, f"'{value}' is not a built-in preset ({', '.join(get_args(Preset))}); custom preset "
                      "files are not supported; left out")
            return
        conv.set("network.preset", value)
    elif key in ("conv_dim", "factor", "block_size", "unit"):
        number = _typed(conv, f"network_args {key}", value, "int")
        if number is not None:
            conv.set("network.block_size" if key == "unit" else f"network.{key}", number)
    elif key in ("conv_alpha", "rank_dropout", "module_dropout"):
        number = _typed(conv, f"network_args {key}", value, "float")
        if number is not None:
            conv.set(f"network.{key}", number)
    elif key == "dropout":
        if module == "networks.lora":
            conv.note(flag, "ignored: networks.lora reads neuron dropout from --network_dropout only")
            return
        number = _typed(conv, "network_args dropout", value, "float")
        if number:
            conv.set("network.dropout", number)
    elif key in ("use_tucker", "use_scalar", "rank_dropout_scale", "train_norm", "decompose_both"):
        flag_value = _typed(conv, f"network_args {key}", value, "bool")
        if flag_value is not None:
            conv.set(f"network.{key}", flag_value)
        if key == "rank_dropout_scale" and flag_value:
            conv.note(flag, "mapped; note that lycoris-lora's kohya entry point does not pass it on, so "
                      "sd-scripts ignored it")
    elif key == "disable_conv_cp":
        conv.note(flag, "deprecated LyCORIS option; set network.use_tucker instead; left out")
    else:
        conv.note(flag, "not mapped: Lathe has no equivalent network option")


def _map_optimizer(conv: Conversion, flags: dict[str, Any]) -> bool:
    choices = get_args(OptimizerType)
    name: str | None = None
    if "optimizer_type" in flags and str(flags["optimizer_type"]).strip():
        given = str(flags["optimizer_type"])
        name = _ci_choice(given, choices)
        if name is None:
            conv.note("--optimizer_type", f"'{given}' is not supported (arbitrary optimizer classes are refused); "
                      f"choose one of {', '.join(choices)}")
            return False
    elif flags.get("use_8bit_adam"):
        name = "AdamW8bit"
    elif flags.get("use_lion_optimizer"):
        name = "Lion"
    for legacy in ("use_8bit_adam", "use_lion_optimizer"):
        if flags.get(legacy) and "optimizer_type" in flags:
            conv.note(f"--{legacy}", "sd-scripts refuses it together with --optimizer_type; --optimizer_type kept")
    if name:
        conv.set("optimizer.type", name)
    if "optimizer_args" in flags:
        args: dict[str, Any] = {}
        for key, value in _key_values(conv, "optimizer_args", flags["optimizer_args"]):
            try:
                args[key] = _literal(value)
            except (ValueError, SyntaxError):
                conv.note(f"--optimizer_args {key}", f"'{value}' is not a Python literal (sd-scripts would fail "
                          "too); left out")
        if args:
            conv.set("optimizer.args", args)
    if "text_encoder_lr" in flags:
        raw = flags["text_encoder_lr"]
        values = [_typed(conv, "text_encoder_lr", v, "float") for v in (raw if isinstance(raw, list) else [raw])]
        values = [v for v in values if v is not None]
        if len(values) == 1:
            conv.set("optimizer.text_encoder_lr", values[0])
        elif values:
            conv.set("optimizer.text_encoder_lr", values)
    return True


def _map_scheduler(conv: Conversion, flags: dict[str, Any]) -> None:
    if "lr_scheduler" in flags:
        conv.set("scheduler.type", str(flags["lr_scheduler"]))
    if flags.get("lr_scheduler_type"):
        conv.note("--lr_scheduler_type", "refused: it loads an arbitrary Python class by name; the scheduler is "
                  f"'{conv.get('scheduler.type', 'constant')}' — for cosine restarts with per-cycle warmup and a "
                  "decaying peak use scheduler.type = 'cosine_annealing_warm_restarts' (built in)")
    if flags.get("lr_scheduler_args"):
        conv.note("--lr_scheduler_args", "refused with --lr_scheduler_type; set the scheduler.* fields instead")
    if "lr_warmup_steps" in flags:
        raw = flags["lr_warmup_steps"]
        text = str(raw).strip()
        if isinstance(raw, str) and text.endswith("%"):
            value = _typed(conv, "lr_warmup_steps", text[:-1], "float")
            value = value / 100 if value is not None else None
        else:
            value = _typed(conv, "lr_warmup_steps", raw, "float")
        if value is not None:
            if value >= 1 and not value.is_integer():
                conv.note("--lr_warmup_steps", f"{value} steps rounded down to {int(value)}")
                value = float(int(value))
            conv.set("scheduler.warmup_steps", int(value) if value >= 1 else value)


def _map_precision_and_save(conv: Conversion, flags: dict[str, Any]) -> None:
    backends = [f for f in ("mem_eff_attn", "xformers", "sdpa") if flags.get(f)]
    if backends:
        # sd-scripts checks them in this order and uses the first one set.
        conv.set("precision.attention", backends[0])
        for extra in backends[1:]:
            conv.note(f"--{extra}", f"ignored: --{backends[0]} wins (as in sd-scripts)")
    else:
        conv.note("", "no attention flag (--sdpa/--xformers/--mem_eff_attn): sd-scripts would use plain attention; "
                  "the spec uses SDPA (same result, less memory)")
    if "save_precision" in flags:
        value = str(flags["save_precision"])
        mapped = canonical_precision(value)
        if mapped is None:
            conv.note("--save_precision", f"'{value}' is not float/fp16/bf16; left out")
        else:
            conv.set("save.save_precision", mapped)
    if "save_model_as" in flags and str(flags["save_model_as"]) != "safetensors":
        conv.note("--save_model_as", f"'{flags['save_model_as']}' not mapped: Lathe saves .safetensors only "
                  "(every tool that loads .ckpt/.pt LoRAs loads .safetensors)")


def _map_samples_and_logging(conv: Conversion, flags: dict[str, Any]) -> None:
    if "sample_prompts" in flags:
        given = str(flags["sample_prompts"])
        path = conv.local_path(given)
        if path is not None and path.suffix.lower() in (".toml", ".json"):
            conv.note("--sample_prompts", f"{given}: prompt files in {path.suffix} are not read; put prompt lines "
                      "('prompt --n negative --w 512 --h 512 --d 1 --l 7 --s 20') in sample.prompts")
        elif path is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            conv.set("sample.prompts", prompts)
        else:
            conv.note("--sample_prompts", f"{given} could not be read here; copy its lines into sample.prompts")
    if "log_with" in flags:
        value = str(flags["log_with"])
        if value == "tensorboard":
            conv.set("logging.log_with", "tensorboard")
        else:
            conv.note("--log_with", f"'{value}': only TensorBoard is available (WandB needs outbound network); "
                      "TensorBoard logs are kept")
    if "logging_dir" in flags:
        conv.note("--logging_dir", "not mapped: TensorBoard logs go to logs/tensorboard in the job directory")


def _map_dataset_config(conv: Conversion, flags: dict[str, Any]) -> None:
    given = str(flags["dataset_config"])
    path = conv.local_path(given)
    if path is None or not path.is_file():
        conv.note("--dataset_config", f"{given} could not be read here; paste its text into dataset.config_toml "
                  "with image_dir paths relative to dataset.uri")
        return
    text = path.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        conv.note("--dataset_config", f"{given} is not valid TOML ({exc}); left out")
        return
    dirs = [s.get("image_dir") for d in doc.get("datasets", []) if isinstance(d, dict)
            for s in d.get("subsets", []) if isinstance(s, dict)]
    dirs = [d for d in dirs if isinstance(d, str) and d]
    if not dirs:
        conv.note("--dataset_config", f"{given} has no [[datasets.subsets]] image_dir; left out")
        return
    # Lathe resolves image_dir inside dataset.uri: use the folder that holds them all as the dataset root.
    norm = [d.replace("\\", "/").rstrip("/") for d in dirs]
    root = posixpath.commonpath(norm) if len(set(map(posixpath.isabs, norm))) == 1 else ""
    if root in norm:
        root = posixpath.dirname(root)
    if not root:
        conv.note("--dataset_config", f"the image_dir entries of {given} share no common folder; upload them under "
                  "one folder and set dataset.uri and relative image_dir values by hand")
        return
    relative = {d: posixpath.relpath(n, root) for d, n in zip(dirs, norm)}

    def rewrite(m: re.Match[str]) -> str:
        value = m.group(3)
        return f"{m.group(1)}{m.group(2)}{relative.get(value, value)}{m.group(2)}" if value in relative else m.group(0)

    text = re.sub(r"""(image_dir\s*=\s*)(["'])(.*?)\2""", rewrite, text)
    if "train_data_dir" in flags:
        conv.note("--train_data_dir", "ignored: --dataset_config wins (as in sd-scripts)")
    if "reg_data_dir" in flags:
        conv.note("--reg_data_dir", "ignored: --dataset_config wins (as in sd-scripts); mark reg subsets is_reg")
        conv.obj.get("dataset", {}).pop("reg_uri", None)
    conv.set("dataset.uri", root)
    conv.set("dataset.config_toml", text)
    conv.note("--dataset_config", f"inlined as dataset.config_toml; dataset.uri is {root} (the folder holding every "
              "image_dir), image_dir values rewritten relative to it")


def _map_save_state(conv: Conversion, flags: dict[str, Any]) -> None:
    steps = conv.get("save.save_every_n_steps")
    epochs = conv.get("save.save_every_n_epochs")
    if steps:
        conv.set("save.checkpoint_every_n_steps", steps)
        return
    if not epochs:
        conv.note("--save_state", "no --save_every_n_steps/epochs: resumable checkpoints every "
                  f"{conv.get('save.checkpoint_every_n_steps', 500)} steps (Lathe's default)")
        return
    per_epoch = _steps_per_epoch(conv)
    if per_epoch is None:
        conv.note("--save_state", f"--save_every_n_epochs={epochs} cannot be turned into steps here (the dataset "
                  "is not a local folder, so steps per epoch are unknown): resumable checkpoints every 500 steps "
                  "(Lathe's default); set save.checkpoint_every_n_steps by hand")
        return
    conv.set("save.checkpoint_every_n_steps", max(1, per_epoch * epochs))
    conv.note("--save_state", f"--save_every_n_epochs={epochs} converted to save.checkpoint_every_n_steps = "
              f"{per_epoch * epochs} ({per_epoch} steps per epoch counted from the local dataset; bucketing can "
              "add a few partial batches)")


def _steps_per_epoch(conv: Conversion) -> int | None:
    uri = conv.get("dataset.uri")
    root = conv.local_path(uri) if isinstance(uri, str) and not conv.get("dataset.config_toml") else None
    if root is None or not root.is_dir():
        return None
    total = 0
    for sub in root.iterdir():
        repeats, sep, _ = sub.name.partition("_")
        if sub.is_dir() and sep and repeats.isdigit():
            images = sum(1 for f in sub.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            total += int(repeats) * images
    if total == 0:
        return None
    batch = conv.get("training.batch_size", 1)
    accumulation = conv.get("training.gradient_accumulation_steps", 1)
    return max(1, math.ceil(math.ceil(total / batch) / accumulation))


def _map_launcher(conv: Conversion, tokens: list[str]) -> None:
    """accelerate launch / torchrun options → resources."""
    if not tokens:
        return
    program = _script_name(tokens[0])
    if program == "accelerate":
        options = tokens[2:] if len(tokens) > 1 and tokens[1] == "launch" else tokens[1:]
    elif program in ("torchrun", "python", "python3", "python.exe", "py"):
        options = [t for t in tokens[1:] if t != "-m"]
    else:
        conv.note(program, "unknown launcher; only accelerate launch, torchrun and python are read")
        return
    flags = _parse_flags([t for t in options if t.startswith("--") or not t.startswith("-")],
                         LAUNCHER_BOOL_FLAGS, frozenset(), conv, "launcher options")
    processes = flags.pop("num_processes", None) or flags.pop("nproc_per_node", None)
    machines = flags.pop("num_machines", None) or flags.pop("nnodes", None)
    gpu_ids = flags.pop("gpu_ids", None)
    if flags.pop("cpu", None):
        conv.set("resources.gpus", 0)
    nodes = _typed(conv, "num_machines", machines, "int") if machines is not None else 1
    nodes = nodes or 1
    total = _typed(conv, "num_processes", processes, "int") if processes is not None else None
    if total is None and gpu_ids is not None:
        ids = [g for g in str(gpu_ids).split(",") if g.strip()]
        if str(gpu_ids).strip() == "all":
            conv.note("--gpu_ids", "'all' does not say how many GPUs; set resources.gpus by hand")
        else:
            total = len(ids) * nodes
    elif gpu_ids is not None:
        conv.note("--gpu_ids", "Lathe picks the GPUs itself; only their number is kept")
    if total is not None:
        if program == "torchrun":
            total *= nodes  # torchrun counts processes per node
        per_node, rest = divmod(total, nodes)
        if rest:
            conv.note("--num_processes", f"{total} processes do not divide over {nodes} machines; using {per_node}")
        conv.set("resources.gpus", max(per_node, 1))
    if nodes != 1:
        conv.set("resources.nodes", nodes)
    for name in ("multi_gpu", "main_process_ip", "main_process_port", "machine_rank", "same_network", "rdzv_backend"):
        flags.pop(name, None)  # Lathe sets up the rendezvous itself
    if "mixed_precision" in flags:
        flags.pop("mixed_precision")
        conv.note("accelerate --mixed_precision", "ignored: sd-scripts' own --mixed_precision (default 'no') is what "
                  "the training uses")
    for name in flags:
        reason = IGNORED_FLAGS.get(name, "launcher option not mapped")
        conv.note(f"accelerate --{name}", reason)


# ---------------------------------------------------------------------------------------------
# Entry points


def _config_flags(doc: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' --config_file: sections are ignored, every key is a flag."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def convert(text: str, *, base_dir: str | os.PathLike[str] | None = None,
            local_files: bool = True) -> tuple[JobSpec | None, list[str]]:
    """An sd-scripts command line (shell script) or config TOML → (JobSpec or None, notes).

    `base_dir` is where relative local paths (dataset config, sample prompts) are looked up; the current
    directory by default; with `local_files=False` no local path is read or listed (they are noted as not
    readable here). Notes list every flag not mapped, with the reason, and any spec problem."""
    conv = Conversion(Path(base_dir) if base_dir is not None else Path.cwd(), local_files=local_files)
    arch = "sd"
    try:
        doc: dict[str, Any] | None = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = None
    if doc and ("datasets" in doc or "general" in doc) and "pretrained_model_name_or_path" not in _config_flags(doc):
        conv.note("", "this is an sd-scripts dataset config ([general]/[[datasets]]), not a training command or "
                  "config; pass the training command (it can reference this file with --dataset_config)")
        return None, conv.notes
    if doc:
        flags = _config_flags(doc)
        conv.note("", "read as an sd-scripts --config_file (the script name is not in it: SDXL is assumed only when "
                  "the file says sdxl = true or names an SDXL model)")
        if flags.pop("sdxl", False) is True:
            arch = "sdxl"
    else:
        script = _Script(text, conv)
        if script.command is None:
            conv.note("", "no sd-scripts training command found (expected train_network.py or "
                      "sdxl_train_network.py, e.g. `accelerate launch sdxl_train_network.py --flag=value …`)")
            return None, conv.notes
        index = _script_index(script.command)
        assert index is not None
        name = _script_name(script.command[index])
        if name not in TRAINING_SCRIPTS:
            conv.note(name, "Lathe trains LoRA/LyCORIS networks only (train_network.py, sdxl_train_network.py)")
            return None, conv.notes
        arch = TRAINING_SCRIPTS[name]
        _map_launcher(conv, script.command[:index])
        flags = _parse_flags(script.command[index + 1:], BOOL_FLAGS, MULTI_FLAGS, conv, "training command")
        for var in sorted(script.unresolved_used):
            conv.note(f"${var}", "shell variable could not be resolved from the script (not set by a simple "
                      "assignment); flags using it were left out or kept as text")
        if "config_file" in flags:
            _merge_config_file(conv, flags)
    if not _map_flags(conv, flags, arch):
        return None, conv.notes
    try:
        spec = spec_from_obj(conv.obj)
    except SpecError as exc:
        conv.notes.extend(f"spec check: {p.path}: {p.message}" for p in exc.problems)
        return None, conv.notes
    conv.notes.extend(f"spec warning: {p.path}: {p.message}" for p in warnings_for(spec))
    return spec, conv.notes


def _merge_config_file(conv: Conversion, flags: dict[str, Any]) -> None:
    """`--config_file` inside a command: its keys are defaults that the command line overrides."""
    given = str(flags.pop("config_file"))
    path = conv.local_path(given if given.endswith(".toml") else given + ".toml")
    if path is None or not path.is_file():
        conv.note("--config_file", f"{given} could not be read here; its options are missing from the spec")
        return
    try:
        config = _config_flags(tomllib.loads(path.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as exc:
        conv.note("--config_file", f"{given} is not valid TOML ({exc}); its options are missing from the spec")
        return
    for key, value in config.items():
        flags.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m trainer from-kohya FILE   (an sd-scripts command/script or config .toml; - for stdin)\n"
              "prints the JobSpec as JSON on stdout; unmapped flags and reasons on stderr; exit 0 when a spec was "
              "produced, 2 otherwise", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    source = args[0]
    try:
        if source == "-":
            text, base = sys.stdin.read(), Path.cwd()
        else:
            text, base = Path(source).read_text(encoding="utf-8"), Path(source).resolve().parent
    except (OSError, UnicodeDecodeError) as exc:
        print(f"from-kohya: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    spec, notes = convert(text, base_dir=base)
    for line in notes:
        print(f"from-kohya: {line}", file=sys.stderr)
    if spec is None:
        print("from-kohya: no spec produced", file=sys.stderr)
        return 2
    sys.stdout.write(encode_spec(spec).decode("utf-8") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
