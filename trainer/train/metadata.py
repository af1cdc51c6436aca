"""sd-scripts' `ss_*` header metadata: the same keys and value formats as train_network.py writes.

sd-scripts builds a dict of Python values and stores `str(value)` for each, so booleans read
"True"/"False", unset options "None", tuples "(512, 512)", and the dataset tables are JSON strings.
Tools (A1111's additional-networks, ComfyUI, Civitai) parse exactly that, so we reproduce it rather
than inventing a cleaner format. `ss_steps`, `ss_epoch` and `ss_training_finished_at` change with
every save (`stamp`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from trainer.core.spec import JobSpec

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class RunFacts:
    """What only the running loop knows, for the header."""

    session_id: int
    training_started_at: float
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    optimizer: str  # "module.Class(k=v,...)"
    seed: int
    mixed_precision: str  # effective: "no" when fp16 fell back on CPU
    world_size: int = 1


def legacy_model_hash(path: str) -> str:
    """sd-scripts' model_hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0x100000)
            return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _warmup_text(value: float) -> Any:
    """sd-scripts keeps --lr_warmup_steps as given: an int of steps or a float ratio."""
    return int(value) if float(value).is_integer() else float(value)


def _lr_text(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def network_args(spec: JobSpec) -> dict[str, str]:
    """The `--network_args` a sd-scripts user would have passed for this network (string values)."""
    net = spec.network
    out: dict[str, str] = {}
    if net.module == "lycoris.kohya":
        out["algo"] = net.algo
        if net.preset != "full":
            out["preset"] = net.preset
    for name in ("conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout"):
        value = getattr(net, name)
        if value is not None and name != "dropout":
            out[name] = str(value)
    for name in ("use_tucker", "use_scalar", "rank_dropout_scale", "train_norm"):
        if getattr(net, name):
            out[name] = "True"
    if net.algo == "lokr":
        out["factor"] = str(net.factor)
        if net.decompose_both:
            out["decompose_both"] = "True"
    if net.algo == "dylora":
        out["block_size"] = str(net.block_size)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(net, name)
        if values is not None:
            out[name] = ",".join(str(v) for v in values)
    return out


def ss_metadata(spec: JobSpec, parts: Any, network: Any, dataset: Any, facts: RunFacts) -> dict[str, str]:
    """The header sd-scripts' train_network.py writes, as strings (before the per-save stamp).
    Key order follows train_network.py's dict, which some readers display as is."""
    dataset_meta = dataset.sd_scripts_metadata(spec.training.batch_size)
    meta: dict[str, Any] = {
        **_run_keys(spec, facts, dataset_meta),
        **_model_keys(spec, parts, facts),
        **_dataset_keys(spec, facts),
        **_dataset_tables(spec, dataset, dataset_meta),
    }
    args = network_args(spec)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    meta.update(_model_file_keys(spec, parts))
    return {k: str(v) for k, v in meta.items()}


def _run_keys(spec: JobSpec, facts: RunFacts, dataset_meta: dict[str, Any]) -> dict[str, Any]:
    """Session, learning rates, image counts and the step plan."""
    opt, tr = spec.optimizer, spec.training
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": spec.save.output_name,
        "ss_learning_rate": opt.learning_rate,
        "ss_text_encoder_lr": _lr_text(opt.text_encoder_lr),
        "ss_unet_lr": opt.unet_lr,
        "ss_num_train_images": dataset_meta["ss_num_train_images"],
        "ss_num_reg_images": dataset_meta["ss_num_reg_images"],
        "ss_num_batches_per_epoch": dataset_meta["ss_num_batches_per_epoch"],
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": tr.gradient_checkpointing,
        "ss_gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": _warmup_text(spec.scheduler.warmup_steps),
        "ss_lr_scheduler": spec.scheduler.type,
    }


def _model_keys(spec: JobSpec, parts: Any, facts: RunFacts) -> dict[str, Any]:
    """Network, precision, base model, noise and optimizer settings."""
    prec, noise, arch = spec.precision, spec.noise, spec.model.arch
    base_version = BASE_MODEL_VERSION[arch] + ("_v" if arch != "sdxl" and parts.v_parameterization else "")
    return {
        "ss_network_module": spec.network.module,
        "ss_network_dim": spec.network.dim,
        "ss_network_alpha": spec.network.alpha,
        "ss_network_dropout": spec.network.dropout,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_full_fp16": bool(prec.full_fp16),
        "ss_v2": arch == "sd2",
        "ss_base_model_version": base_version,
        "ss_clip_skip": spec.model.clip_skip,
        "ss_max_token_length": spec.dataset.max_token_length,
        "ss_cache_latents": bool(prec.cache_latents),
        "ss_seed": facts.seed,
        "ss_lowram": spec.model.lowram,
        "ss_noise_offset": noise.noise_offset,
        "ss_multires_noise_iterations": noise.multires_noise_iterations,
        "ss_multires_noise_discount": noise.multires_noise_discount,
        "ss_adaptive_noise_scale": noise.adaptive_noise_scale,
        "ss_zero_terminal_snr": False,
        "ss_training_comment": spec.save.training_comment,
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": spec.optimizer.max_grad_norm,
    }


def _dataset_keys(spec: JobSpec, facts: RunFacts) -> dict[str, Any]:
    """Captions, augmentation, batch sizes and bucketing."""
    ds, tr, opt = spec.dataset, spec.training, spec.optimizer
    bs = tr.batch_size
    w, h = ds.resolution_wh
    return {
        "ss_caption_dropout_rate": ds.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": ds.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": ds.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": ds.prior_loss_weight,
        "ss_min_snr_gamma": tr.min_snr_gamma,
        "ss_scale_weight_norms": opt.scale_weight_norms,
        "ss_full_bf16": bool(spec.precision.full_bf16),
        "ss_batch_size_per_device": bs,
        "ss_total_batch_size": bs * facts.world_size * tr.gradient_accumulation_steps,
        "ss_resolution": (w, h),
        "ss_color_aug": bool(ds.color_aug),
        "ss_flip_aug": bool(ds.flip_aug),
        "ss_random_crop": bool(ds.random_crop),
        "ss_shuffle_caption": bool(ds.shuffle_caption),
        "ss_enable_bucket": bool(ds.enable_bucket),
        "ss_bucket_no_upscale": bool(ds.bucket_no_upscale),
        "ss_min_bucket_reso": ds.min_bucket_reso,
        "ss_max_bucket_reso": ds.max_bucket_reso,
        "ss_keep_tokens": ds.keep_tokens,
        "ss_caption_extension": ds.caption_extension,
    }


def _dataset_tables(spec: JobSpec, dataset: Any, dataset_meta: dict[str, Any]) -> dict[str, str]:
    """The JSON-valued dataset keys: folders (training and regularisation), tags, buckets, TOML datasets."""
    reg_dirs = {s.name: {"n_repeats": s.num_repeats, "img_count": len(s.images)}
                for s in dataset.subsets if s.is_reg and s.images}
    train_dirs = {k: v for k, v in dataset_meta["ss_dataset_dirs"].items() if k not in reg_dirs}
    out = {
        "ss_dataset_dirs": json.dumps(train_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset_meta["ss_tag_frequency"]),
        "ss_bucket_info": json.dumps(dataset_meta["ss_bucket_info"]),
    }
    if spec.dataset.config_toml is not None:
        out["ss_datasets"] = json.dumps(_datasets_table(spec, dataset, spec.training.batch_size))
    return out


def _model_file_keys(spec: JobSpec, parts: Any) -> dict[str, str]:
    """The base model's (and VAE's) file name and hashes."""
    out = {"ss_sd_model_name": os.path.basename(spec.model.uri.rstrip("/"))}
    source = getattr(parts, "source", None)
    if source and os.path.isfile(source):
        out["ss_sd_model_hash"] = legacy_model_hash(source)
        out["ss_new_sd_model_hash"] = file_sha256(source)
    if spec.model.vae:
        out["ss_vae_name"] = os.path.basename(spec.model.vae.rstrip("/"))
    return out


def _datasets_table(spec: JobSpec, dataset: Any, batch_size: int) -> list[dict[str, Any]]:
    """sd-scripts' `ss_datasets` for user-config (TOML) datasets: one entry per [[datasets]]."""
    out = []
    for di, params in enumerate(dataset.datasets):
        b = params.buckets
        subsets = [s for s in dataset.subsets if s.dataset == di]
        out.append({
            "is_dreambooth": True,
            "batch_size_per_device": params.batch_size or batch_size,
            "num_train_images": sum(len(s.images) * s.num_repeats for s in subsets if not s.is_reg),
            "num_reg_images": sum(len(s.images) * s.num_repeats for s in subsets if s.is_reg),
            "resolution": list(b.resolution),
            "enable_bucket": bool(b.enable_bucket),
            "min_bucket_reso": b.min_reso,
            "max_bucket_reso": b.max_reso,
            "subsets": [{
                "img_count": len(s.images), "num_repeats": s.num_repeats, "color_aug": bool(s.color_aug),
                "flip_aug": bool(s.flip_aug), "random_crop": bool(s.random_crop),
                "shuffle_caption": bool(s.caption.shuffle),
                "keep_tokens": s.caption.keep_tokens, "image_dir": os.path.basename(s.image_dir),
                "class_tokens": s.class_tokens, "is_reg": s.is_reg,
            } for s in subsets],
        })
    return out


def stamp(meta: dict[str, str], *, steps: int, epoch: int, now: float | None = None) -> dict[str, str]:
    """The per-save keys: training_finished_at, steps, epoch (sd-scripts sets them in save_model)."""
    out = dict(meta)
    out["ss_training_finished_at"] = str(now if now is not None else time.time())
    out["ss_steps"] = str(steps)
    out["ss_epoch"] = str(epoch)
    return out
