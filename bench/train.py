"""Benchmark of one LoRA training step: it/s, peak memory, FLOPs and MFU, side by side with a baseline.

The step is the trainer's own: `prepare_model` (frozen parts on the device, attention, adapter hooked
in, gradient checkpointing), the accelerate `Accelerator` of `make_accelerator`, the optimizer and
scheduler builders, and `micro_batch_loss` (cached latents → noise → UNet → weighted MSE) followed
by backward, gradient clipping, optimizer and scheduler step, as `TrainingRecipe`
(trainer/train/recipe.py) runs them. Only the data is synthetic: random latents and text-encoder
outputs stand in for the latent and text caches, and every model is built from
`trainer/models/configs/` with random weights (speed and memory do not depend on the weights'
values). The frozen VAE and text encoders are built on the device and then parked on the CPU by
`park_idle_modules`, as `run_training` does once the caches make them idle.

Each (model, resolution, batch size, variant) runs in a fresh process, so peak memory and compile
caches do not leak from one row to the next. Every group starts with the baseline, plain fp32
without gradient checkpointing, and the other rows are reported as ratios against it:

- `fp32`: mixed_precision "no", UNet in fp32, eager (the baseline);
- `bf16`: mixed_precision "bf16" (frozen weights in bf16, bf16 autocast, adapter in fp32), as
  `trainer/job/train_job.py` loads a bf16 job;
- `+gc`: training.gradient_checkpointing; `+compile`: precision.torch_compile (inductor; `--backend`),
  which compiles the step's forward and loss as `TrainingRecipe` does (CUDA graphs on CUDA).

Attention is SDPA (precision.attention "sdpa") in every row. FLOPs per step are counted with
`torch.utils.flop_counter.FlopCounterMode` over one eager step (with gradient checkpointing the
count includes the recomputed forward); MFU uses the group's model FLOPs (the count without
checkpointing) × it/s ÷ the GPU's dense bf16 peak, for every row, fp32 ones included.

    # on a GPU: SD1.5 at 512² and SDXL at 1024², batch 1 and 4; fp32 baseline, bf16, bf16+gc,
    # bf16+compile, bf16+gc+compile (split so that each command stays near 10 minutes)
    .venv/bin/python bench/train.py --models sd15 --json sd15.json --out sd15.md
    .venv/bin/python bench/train.py --models sdxl --batch-sizes 1 --json sdxl-bs1.json --out sdxl-bs1.md
    .venv/bin/python bench/train.py --models sdxl --batch-sizes 4 --json sdxl-bs4.json --out sdxl-bs4.md
    # on CPU (`make bench`): the real SD1.5 architecture at 128², batch 1 and 2, a few steps
    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE = "fp32"
# name → (mixed_precision, gradient checkpointing, torch.compile)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    f"{precision}{'+gc' if gc else ''}{'+compile' if compiled else ''}": (mixed, gc, compiled)
    for precision, mixed in (("fp32", "no"), ("bf16", "bf16"))
    for compiled in (False, True)
    for gc in (False, True)
}
MODELS = {"sd15": "sd1", "sdxl": "sdxl"}
# Resolution (pixels; latents are 1/8) per size: full = the models' native training size.
RESOLUTIONS = {"full": {"sd15": 512, "sdxl": 1024}, "small": {"sd15": 128, "sdxl": 128}}
BATCH_SIZES = {"full": (1, 4), "small": (1, 2)}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s; the first pattern
# that matches torch.cuda.get_device_name() wins. `--peak-tflops` overrides (and covers other GPUs).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200.*NVL", 835.0),
    (r"H200", 989.0),  # SXM, GH200
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"RTX 4090", 165.0),
]
SDXL_TARGET_GIB = 12.0  # issue: SDXL, LoRA dim 32, bs 1, gradient checkpointing, cached latents


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX); without it torch emulates bf16
    matmuls, which on the 2-core dev host made a step ~30× slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_bf16_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


@dataclass(frozen=True)
class Case:
    model: str  # sd15 / sdxl
    resolution: int  # pixels (square)
    batch_size: int
    variant: str
    device: str
    steps: int
    warmup: int
    dim: int
    alpha: float
    module: str
    count_flops: bool
    profile: bool = False
    backend: str = "inductor"  # precision.dynamo_backend of +compile rows (aot_eager for a CPU dry run)


# --- child: one case in a fresh process ------------------------------------------------------------


def _random_parts(arch: str, device: Any, dtype: Any) -> Any:
    """ModelParts of the standard architecture with random weights, in `dtype` on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.load import NOISE_SCHEDULE, ModelParts, standard_config

    config = standard_config(arch)
    torch.manual_seed(0)
    # Built on the device, then cast: on a GPU this skips a slow CPU initialisation; the fp32
    # transient is gone (and the peak statistics reset) before the first step.
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config["unet"])
        vae = AutoencoderKL.from_config(config["vae"])
        encoders = [CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))]
        if arch == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])))
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return ModelParts(arch=arch, unet=unet, vae=vae, text_encoders=encoders, tokenizers=[],
                      noise_scheduler=DDPMScheduler(**NOISE_SCHEDULE, prediction_type="epsilon"),
                      v_parameterization=False, vae_scaling_factor=float(vae.config.scaling_factor), source="random")


def _spec(case: Case) -> Any:
    from trainer.core.spec import spec_from_obj

    mixed, checkpointing, compiled = VARIANTS[case.variant]
    return spec_from_obj({
        "version": 1,
        "model": {"uri": "random-weights", "arch": MODELS[case.model]},
        "dataset": {"uri": "synthetic", "resolution": case.resolution},
        "network": {"module": case.module, "dim": case.dim, "alpha": case.alpha, "train_unet_only": True},
        "optimizer": {"type": "AdamW", "learning_rate": 1e-4},
        "training": {"max_train_steps": case.warmup + case.steps + 1, "batch_size": case.batch_size,
                     "gradient_checkpointing": checkpointing, "seed": 0},
        "precision": {"mixed_precision": mixed, "attention": "sdpa", "cache_latents": True,
                      "cache_text_encoder_outputs": True, "torch_compile": compiled,
                      "dynamo_backend": case.backend},
        "resources": {"gpus": 1 if case.device == "cuda" else 0},
    })


def _synthetic_batches(case: Case, parts: Any, weight_dtype: Any) -> tuple[Any, dict, list]:
    """A latent cache, a text cache and two batches over them, shaped as the trainer's caches."""
    import torch

    from trainer.data.dataset import Batch
    from trainer.train.latents import LatentCache

    unet_config = parts.unet.config
    res, bs = case.resolution, case.batch_size
    g = torch.Generator().manual_seed(0)
    cache, text_cache, batches = LatentCache(), {}, []
    pooled_dim = None
    if parts.arch == "sdxl":
        pooled_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    for b in range(2):
        keys = [f"img{b}-{i}" for i in range(bs)]
        for key in keys:
            cache.entries[key] = (torch.randn(4, res // 8, res // 8, generator=g), None)
            hidden = torch.randn(77, unet_config.cross_attention_dim, generator=g).to(weight_dtype)
            pooled = torch.randn(pooled_dim, generator=g).to(weight_dtype) if pooled_dim else None
            text_cache[key] = (hidden, pooled)
        size = torch.tensor([[res, res]] * bs, dtype=torch.long)
        batches.append(Batch(pixel_values=None, captions=[""] * bs, input_ids=[],
                             loss_weights=torch.ones(bs), original_sizes_hw=size,
                             crop_top_lefts=torch.zeros(bs, 2, dtype=torch.long), target_sizes_hw=size,
                             image_keys=keys, flipped=[False] * bs, bucket=(res, res)))
    return cache, text_cache, batches


def _proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in GiB (empty where /proc is missing)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {ln.split(":")[0]: int(ln.split()[1]) / 2**20 for ln in lines if ln.startswith(("VmRSS:", "VmHWM:"))}


class _Memory:
    """Peak memory over the steps: CUDA allocator statistics, or the process's peak RSS on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.start_rss_gib: float | None = None

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.start_rss_gib = _proc_status().get("VmRSS")

    def peak_gib(self) -> dict[str, float]:
        import torch

        if self.cuda:
            return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        status = _proc_status()
        if "VmHWM" in status:
            return {"peak_rss_gib": status["VmHWM"], "rss_at_start_gib": self.start_rss_gib}
        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_case(case: Case) -> dict[str, Any]:
    import torch

    from trainer.models.network import build_network
    from trainer.core.spec import compile_choice
    from trainer.train.compiled import TimedCompile, cuda_speedups
    from trainer.train.loop import (autocast_for, make_accelerator, micro_batch_inputs, park_idle_modules,
                                    prediction_loss, prepare_model, seed_everything)
    from trainer.train.optim import build_optimizer
    from trainer.train.schedule import build_scheduler

    t0 = time.perf_counter()
    cuda = case.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    spec = _spec(case)
    _, _, compiled = VARIANTS[case.variant]
    # Weight dtypes as trainer/job/train_job.py loads a job: frozen weights in the mixed-precision dtype.
    weight_dtype = torch.bfloat16 if spec.precision.mixed_precision == "bf16" else torch.float32
    acc = make_accelerator(spec)
    device = acc.device
    parts = _random_parts(MODELS[case.model], device, weight_dtype)
    seed_everything(0)
    network = build_network(spec.network, parts, train_unet=True, train_text_encoder=False)
    model = prepare_model(spec, parts, network, device, train_te=False)
    lr = spec.optimizer.learning_rate
    built = build_optimizer(spec.optimizer, network.param_groups(unet_lr=lr, text_encoder_lr=lr))
    scheduler = build_scheduler(spec.scheduler, built.optimizer, total_steps=spec.training.max_train_steps,
                                warmup_steps=0, relative_step_lr=built.relative_step_lr)
    model, optimizer = acc.prepare(model, built.optimizer)
    trainable = [p for p in network.parameters() if p.requires_grad]
    cache, text_cache, batches = _synthetic_batches(case, parts, weight_dtype)
    park_idle_modules(parts, device, vae_idle=True, text_encoders_idle=True)
    max_grad_norm = spec.optimizer.max_grad_norm
    cuda_speedups(parts, device)
    choice, autocast = compile_choice(spec, cuda=cuda), autocast_for(acc)

    def loss_of(**inputs: Any) -> Any:
        return prediction_loss(model, parts, spec, None, autocast, False, **inputs)

    compiled_loss = TimedCompile(loss_of, backend=case.backend, fullgraph=choice.fullgraph, cuda=cuda) if choice.on else None

    def step(index: int) -> Any:
        """One optimizer update as TrainingRecipe runs it (one micro-batch, no accumulation); the loss stays on
        the device, so nothing waits for the GPU inside the step."""
        inputs = micro_batch_inputs(batches[index % len(batches)], parts, spec, cache, text_cache, device)
        loss = (compiled_loss or loss_of)(**inputs)
        acc.backward(loss)
        if max_grad_norm > 0:
            acc.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    memory = _Memory(cuda)
    gc.collect()
    memory.reset()
    setup_s = time.perf_counter() - t0
    index = 0
    t1 = time.perf_counter()
    for _ in range(case.warmup):  # the first steps allocate optimizer state (and compile)
        step(index)
        index += 1
    sync()
    warmup_s = time.perf_counter() - t1

    flops = None
    if case.count_flops and not compiled:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        # FlopCounterMode knows the CUDA SDPA kernels; on CPU the math backend spells attention
        # out as matmuls, which it counts (the same FLOPs).
        backend = sdpa_kernel([SDPBackend.MATH]) if not cuda else contextlib.nullcontext()
        with backend, FlopCounterMode(display=False) as counter:
            step(index)
        index += 1
        flops = int(counter.get_total_flops())

    # The timed steps run back to back with one synchronisation at the end, as the recipe runs them between
    # two loss flushes; each step's figure is the block's mean.
    sync()
    ts = time.perf_counter()
    pending = []
    for _ in range(case.steps):
        pending.append(step(index))
        index += 1
    sync()
    total = time.perf_counter() - ts
    times = [total / case.steps] * case.steps
    losses = [float(v) for v in pending]
    if not all(map(math.isfinite, losses)):
        raise RuntimeError(f"non-finite loss in the timed steps: {losses}")
    profile = _profile_steps(step, index, sync, cuda) if case.profile else None
    result: dict[str, Any] = {
        **asdict(case),
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "setup_s": setup_s,
        "compile_s": compiled_loss.seconds if compiled_loss else None,
        "warmup_s": warmup_s,
        "step_s": times,
        "step_median_s": sorted(times)[len(times) // 2],
        "step_min_s": min(times),  # the least disturbed step, for noisy shared hosts
        "it_per_s": len(times) / total,
        "samples_per_s": len(times) * case.batch_size / total,
        "executed_flops": flops,
        "losses": losses,
        "adapter_params": sum(p.numel() for p in trainable),
        "adapter_modules": len(network.loras()),
        "unet_params": sum(p.numel() for p in parts.unet.parameters()),
        # The frozen weights: the UNet on the device; on CUDA the VAE and text encoders are parked on the CPU.
        "weights_gib": {name: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30
                        for name, m in (("unet", parts.unet), ("vae", parts.vae),
                                        ("text_encoders", torch.nn.ModuleList(parts.text_encoders)))},
        **memory.peak_gib(),
        "profile": profile,
    }
    return result


def _profile_steps(step: Any, index: int, sync: Any, cuda: bool, steps: int = 3) -> dict[str, Any]:
    """Where a step's time goes, from torch.profiler over `steps` more steps: how long the device was
    busy (the sum of kernel times) against the wall time, and which host-side ops cost the most. A
    device busy for a small fraction of the step means the step is bound by the host (op dispatch
    and kernel launches), which compile or CUDA graphs address, not faster kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(index + i)
        sync()
        wall = (time.perf_counter() - t0) / steps
    averages = prof.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    aten = [e for e in averages if e.key.startswith("aten::")]
    out: dict[str, Any] = {
        "steps": steps,
        "wall_s_per_step": wall,
        "aten_calls_per_step": sum(e.count for e in aten) / steps,
        "top_self_cpu_ms_per_step": [[e.key, e.self_cpu_time_total / 1e3 / steps]
                                     for e in sorted(aten, key=lambda e: -e.self_cpu_time_total)[:10]],
    }
    if cuda:
        busy = sum(device_us(e) for e in averages) / 1e6 / steps
        launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        out.update(device_busy_s_per_step=busy, device_busy_fraction=busy / wall,
                   kernel_launches_per_step=launches / steps)
    return out


# --- parent: cases, children, table ----------------------------------------------------------------


def run_child(case: Case, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(case))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**asdict(case), "error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        error = "out of memory" if "out of memory" in proc.stderr.lower() else tail[0][:200]
        return {**asdict(case), "error": error, "stderr_tail": proc.stderr[-3000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = time.perf_counter() - t0
    return result


def add_ratios(rows: list[dict[str, Any]], peak_tflops: float | None) -> None:
    """Ratios against the group's baseline row, model FLOPs, achieved TFLOP/s and MFU."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["resolution"], r["batch_size"]), []).append(r)
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        # The fp32 baseline; where it failed (fp32 SDXL at batch 4 may not fit), the first row that ran.
        base = next((r for r in ok if r["variant"] == BASELINE), ok[0] if ok else None)
        # Model FLOPs: a count without gradient checkpointing (its recompute is not model work).
        plain = [r["executed_flops"] for r in ok if r.get("executed_flops") and not VARIANTS[r["variant"]][1]]
        model_flops = plain[0] if plain else None
        for r in ok:
            mem_key = "peak_allocated_gib" if "peak_allocated_gib" in r else "peak_rss_gib"
            r["model_flops"] = model_flops
            if base is not None:
                r["baseline_variant"] = base["variant"]
                r["speedup_vs_baseline"] = r["it_per_s"] / base["it_per_s"]
                r["memory_vs_baseline"] = r[mem_key] / base[mem_key]
            if model_flops:
                r["achieved_tflops"] = model_flops * r["it_per_s"] / 1e12
                if peak_tflops:
                    r["mfu"] = r["achieved_tflops"] / peak_tflops


def row_summary(r: dict[str, Any]) -> str:
    """One console line per row: the figures a cut-off run still shows in its log."""
    if "error" in r:
        return f"FAILED ({r['error']})"
    parts = [f"{r['it_per_s']:.3g} it/s", f"setup {r['setup_s']:.0f} s", f"warm-up {r['warmup_s']:.1f} s",
             f"process {r['process_s']:.0f} s"]
    if "peak_reserved_gib" in r:
        parts.append(f"peak {r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} GiB")
    if r.get("executed_flops"):
        parts.append(f"{r['executed_flops'] / 1e9:,.0f} GFLOP/step")
    profile = r.get("profile") or {}
    if "device_busy_fraction" in profile:
        parts.append(f"device busy {profile['device_busy_fraction']:.0%}, "
                     f"{profile['kernel_launches_per_step']:,.0f} launches/step")
    return ", ".join(parts)


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown report of the rows so far (ratios recomputed, so it can be written after every row)."""
    peak, steps, warmup = meta["peak_bf16_tflops"], meta["steps"], meta["warmup"]
    add_ratios(rows, peak)
    cuda = meta["device"] == "cuda"
    threads = meta["omp_num_threads"]
    where = (f"{meta['device_name']}, torch {meta['torch']}" if cuda else
             f"CPU ({meta['device_name']}, {meta['cpus']} cores, OMP_NUM_THREADS={threads}, load average "
             f"{meta['load_average']:.1f}), torch {meta['torch']} — CPU figures, not GPU figures")
    return "\n".join([
        f"`{meta['command']}` — {where}; LoRA `{meta['module']}` dim {meta['dim']} alpha {meta['alpha']:g}, AdamW, SDPA, cached "
        f"latents and text-encoder outputs; {steps} timed step{'s' if steps != 1 else ''} after {warmup} warm-up"
        + (f"; MFU against {peak:g} TFLOP/s dense bf16" if peak else "") + ".",
        "",
        markdown(rows, meta),
    ])


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cuda = meta["device"] == "cuda"
    mem = "peak alloc. / reserved GiB" if cuda else "peak RSS GiB"
    lines = [
        "| model | res | bs | variant | it/s | samples/s | × baseline it/s | " + mem
        + " | × baseline mem | GFLOP/step (run) | TFLOP/s (model) | MFU | warm-up s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['resolution']}² | {r['batch_size']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | | |")
            continue
        memory = (f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if cuda
                  else f"{r['peak_rss_gib']:.2f}")
        flops = r.get("executed_flops")
        versus = "" if r.get("baseline_variant", BASELINE) == BASELINE else f" (vs {r['baseline_variant']})"
        lines.append(
            f"{head} {r['it_per_s']:.3g} | {r['samples_per_s']:.3g} | {_fmt(r.get('speedup_vs_baseline'), '.2f', '×')}"
            f"{versus} | {memory} | {_fmt(r.get('memory_vs_baseline'), '.2f', '×')}{versus} | "
            f"{_fmt(flops / 1e9 if flops else None, ',.0f')} | {_fmt(r.get('achieved_tflops'), '.3g')} | "
            f"{_fmt(r['mfu'] * 100 if r.get('mfu') is not None else None, '.1f', '%')} | {r['warmup_s']:.1f} |"
        )
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "| model | res | bs | variant | profiled s/step | device busy s/step | busy | kernel launches/step "
                  "| aten calls/step | top host op (ms/step) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in profiled:
            pr = r["profile"]
            top = pr["top_self_cpu_ms_per_step"][0] if pr["top_self_cpu_ms_per_step"] else ("–", 0.0)
            lines.append(f"| {r['model']} | {r['resolution']}² | {r['batch_size']} | {r['variant']} | "
                         f"{pr['wall_s_per_step']:.3f} | {_fmt(pr.get('device_busy_s_per_step'), '.3f')} | "
                         f"{_fmt(pr['device_busy_fraction'] * 100 if 'device_busy_fraction' in pr else None, '.0f', '%')} | "
                         f"{_fmt(pr.get('kernel_launches_per_step'), ',.0f')} | {pr['aten_calls_per_step']:,.0f} | "
                         f"`{top[0]}` {top[1]:.1f} |")
    if cuda:
        sdxl = [r for r in rows if r["model"] == "sdxl" and r["batch_size"] == 1 and r["resolution"] == 1024
                and "error" not in r and VARIANTS[r["variant"]][:2] == ("bf16", True)]
        for r in sdxl:
            verdict = "met" if r["peak_reserved_gib"] < SDXL_TARGET_GIB else "MISSED"
            lines.append(f"\nSDXL 1024² bs 1 `{r['variant']}`: peak reserved {r['peak_reserved_gib']:.2f} GiB "
                         f"(allocated {r['peak_allocated_gib']:.2f}) against the {SDXL_TARGET_GIB:.0f} GiB target: {verdict}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    parser.add_argument("--size", choices=("full", "small"),
                        help="full: SD1.5 512², SDXL 1024², bs 1 and 4 (GPU default); small: 128², bs 1 and 2 (CPU default)")
    parser.add_argument("--models", help="comma-separated sd15,sdxl (default: both on full, sd15 on small)")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 1,4 on full, 1,2 on small)")
    parser.add_argument("--resolution", type=int, help="pixels, for every model (default: by --size)")
    parser.add_argument("--variants", help=f"comma-separated from {','.join(VARIANTS)}; the baseline "
                        f"{BASELINE!r} always runs first (default cuda: fp32,bf16,bf16+gc,bf16+compile,bf16+gc+compile; "
                        "cpu: fp32,fp32+gc, plus bf16,bf16+gc where the CPU has native bf16)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: 10 on cuda, 2 on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on cuda, 1 on cpu; "
                        "compiled rows at least 2)")
    parser.add_argument("--dim", type=int, default=32, help="LoRA rank (network.dim)")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--module", default="networks.lora", choices=("networks.lora", "lycoris.kohya"),
                        help="networks.lora: sd-scripts' layer set (attention/MLP), as its LoRA benchmarks use")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU for MFU (default: looked up by name)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    parser.add_argument("--profile", action="store_true",
                        help="profile 3 more steps per row: device-busy fraction, kernel launches, top host ops")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per row")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="leave out the fp32 row (a short lease); ratios are then against the first row")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend of +compile rows (aot_eager: a CPU dry run without inductor)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--out", help="also write the markdown to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()

    if a.child:
        result = run_case(Case(**json.loads(a.child)))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    cuda = device == "cuda"
    size = a.size or ("full" if cuda else "small")
    models = (a.models or ("sd15,sdxl" if size == "full" else "sd15")).split(",")
    batch_sizes = [int(b) for b in (a.batch_sizes or ",".join(map(str, BATCH_SIZES[size]))).split(",")]
    default_variants = (["fp32", "bf16", "bf16+gc", "bf16+compile", "bf16+gc+compile"] if cuda
                        else ["fp32", "fp32+gc", *(["bf16", "bf16+gc"] if cpu_has_bf16() else [])])
    variants = a.variants.split(",") if a.variants else default_variants
    for name in [*models, *variants]:
        if name not in MODELS and name not in VARIANTS:
            parser.error(f"unknown model or variant {name!r}: models {', '.join(MODELS)}; variants {', '.join(VARIANTS)}")
    if not a.skip_baseline:
        variants = [BASELINE] + [v for v in variants if v != BASELINE]
    steps = a.steps or (10 if cuda else 2)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    peak = a.peak_tflops or (peak_bf16_tflops(device_name) if cuda else None)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    meta = {
        "device": device, "device_name": device_name, "size": size, "peak_bf16_tflops": peak,
        "torch": torch.__version__, "cpus": os.cpu_count(), "omp_num_threads": threads,
        "load_average": os.getloadavg()[0], "command": " ".join(["bench/train.py", *sys.argv[1:]]),
        "dim": a.dim, "alpha": a.alpha, "module": a.module, "steps": steps, "warmup": warmup,
        "date": time.strftime("%Y-%m-%d"),
    }
    if not cuda:
        print("NOTE: CPU run. These are CPU figures at reduced size: they compare the variants with each other "
              "on this host and are NOT GPU figures (no VRAM, no MFU).", file=sys.stderr)
        if not a.variants and not cpu_has_bf16():
            print("NOTE: this CPU has no native bf16 (AVX512-BF16/AMX): bf16 rows left out (ask with --variants)",
                  file=sys.stderr)
    elif peak is None:
        print(f"NOTE: no bf16 peak known for {device_name!r}: pass --peak-tflops for MFU", file=sys.stderr)

    rows = []
    for model in models:
        res = a.resolution or RESOLUTIONS[size][model]
        for bs in batch_sizes:
            for variant in variants:
                case = Case(model=model, resolution=res, batch_size=bs, variant=variant, device=device, steps=steps,
                            warmup=max(warmup, 2) if VARIANTS[variant][2] else warmup, dim=a.dim, alpha=a.alpha,
                            module=a.module, count_flops=not a.no_flops, profile=a.profile, backend=a.backend)
                r = run_child(case, a.child_timeout)
                rows.append(r)
                print(f"{model} {res}² bs {bs} {variant}: {row_summary(r)}", file=sys.stderr)
                # After every row, so a run cut short (a lent GPU's minutes run out) keeps what it measured.
                text = report(rows, meta)
                if a.out:
                    Path(a.out).write_text(text + "\n")
                if a.json:
                    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
