"""Benchmark of `trainer.shrink` on a generated SDXL-shaped LoRA.

Generates (once, into --work) a LoRA on every attention/MLP layer of the SDXL UNet (722 layers, SGM
naming, realistic shapes, fp16) at ranks 64 and 32, and a base "checkpoint" holding just those layers'
weights in SGM layout. Then, each in a fresh process (wall time and peak RSS per run):
- our shrink for every rule (fixed rank, sv_ratio, sv_fro, sv_cumulative, fro_ckpt cold/warm cache,
  spn_ckpt), with its relative error;
- the I/O floor: reading the input and writing the output file, nothing else;
- the sd-scripts-style baseline: materialise ΔW and take a full `torch.linalg.svd` per layer, timed
  once per distinct layer shape and multiplied by the layer count (the whole run takes many minutes);
- resize_lora's rank rule re-derived straight from its definition (QR-SVD of each layer's factors,
  σ·alpha/dim against the base norm) to check that our recipes pick the same per-layer ranks.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shrink.py [--work .lathe/bench-shrink] [--out FILE.md]

--device cuda decomposes on the GPU (the CUDA context is made before the clock starts, as in a job);
--ranks, --tries, --skip-reference and --skip-baseline shorten a run (a lent GPU's minutes are few).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CROSS_ATTENTION_DIM = 2048
# (SGM transformer prefix, channels, depth) for SDXL's UNet.
SDXL_TRANSFORMERS = (
    [(f"input_blocks.{i}.1", 640, 2) for i in (4, 5)]
    + [(f"input_blocks.{i}.1", 1280, 10) for i in (7, 8)]
    + [("middle_block.1", 1280, 10)]
    + [(f"output_blocks.{i}.1", 1280, 10) for i in (0, 1, 2)]
    + [(f"output_blocks.{i}.1", 640, 2) for i in (3, 4, 5)]
)


def sdxl_layers() -> list[tuple[str, int, int]]:
    """(SGM module path, out, in) of every attention/MLP linear of the SDXL UNet."""
    layers = []
    for prefix, c, depth in SDXL_TRANSFORMERS:
        layers += [(f"{prefix}.proj_in", c, c), (f"{prefix}.proj_out", c, c)]
        for b in range(depth):
            t = f"{prefix}.transformer_blocks.{b}"
            layers += [(f"{t}.attn1.{p}", c, c) for p in ("to_q", "to_k", "to_v", "to_out.0")]
            layers += [(f"{t}.attn2.to_q", c, c), (f"{t}.attn2.to_k", c, CROSS_ATTENTION_DIM)]
            layers += [(f"{t}.attn2.to_v", c, CROSS_ATTENTION_DIM), (f"{t}.attn2.to_out.0", c, c)]
            layers += [(f"{t}.ff.net.0.proj", 8 * c, c), (f"{t}.ff.net.2", c, 4 * c)]
    return layers


def lora_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def generate(work: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    layers = sdxl_layers()
    paths = {"base": work / "sdxl-base-attn.safetensors"}
    for rank in (64, 32):
        paths[f"lora{rank}"] = work / f"sdxl-lora-r{rank}.safetensors"
    if all(p.exists() for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(0)
    for rank in (64, 32):
        tensors = {}
        # A trained-like spectrum: σ_i decaying over the rank, so dynamic rules have something to cut.
        decay = torch.exp(-torch.arange(rank, dtype=torch.float32) / (rank / 8))
        for path, out, inn in layers:
            name = lora_name(path)
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, inn, generator=g) / math.sqrt(inn)).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01 * decay).half()
            tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_base_model_version": "sdxl_base_v1-0",
                "ss_network_module": "networks.lora", "ss_training_comment": "bench"}
        save_file(tensors, str(paths[f"lora{rank}"]), metadata=meta)
        del tensors
    base = {}
    for path, out, inn in layers:
        base[f"model.diffusion_model.{path}.weight"] = (torch.randn(out, inn, generator=g) / math.sqrt(inn)).half()
    save_file(base, str(paths["base"]))
    return paths


# --- children (one process per measurement) ------------------------------------------------------


def child_shrink(args: dict) -> dict:
    from trainer.shrink.pipeline import shrink_file  # imports (torch) outside the timed region

    device = args.get("device", "cpu")
    if device.startswith("cuda"):  # the CUDA context too: a job's trainer has made it long before
        import torch

        torch.zeros(1, device=device).sum().item()
    t0, c0 = time.perf_counter(), time.process_time()
    report = shrink_file(args["input"], args["output"], base=args.get("base"), device=device, **args["rule"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ranks = [r.new_rank for r in report.layers]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rel_error": report.totals.rel_error,
        "max_layer_rel_error": report.totals.max_rel_error,
        "mib_out": report.totals.bytes_out / 2**20,
        "mean_rank": sum(ranks) / len(ranks),
        "ranks": {r.name: r.new_rank for r in report.layers},
        "timings": report.timings_s,
    }


def child_io_floor(args: dict) -> dict:
    from safetensors.torch import load_file, save_file

    c0 = time.process_time()
    t0 = time.perf_counter()
    load_file(args["input"])
    t1 = time.perf_counter()
    c1 = time.process_time()
    out = load_file(args["shrunk"])  # the output we wrote, written again: the write half of the floor
    t2, c2 = time.perf_counter(), time.process_time()
    save_file(out, args["output"])
    t3, c3 = time.perf_counter(), time.process_time()
    return {"wall_s": (t1 - t0) + (t3 - t2), "cpu_s": (c1 - c0) + (c3 - c2), "read_s": t1 - t0, "write_s": t3 - t2}


def child_baseline(args: dict) -> dict:
    """sd-scripts' resize per layer: ΔW = up@down in fp32, full torch.linalg.svd (full_matrices)."""
    import torch
    from safetensors import safe_open

    from trainer.shrink.adapter_layers import parse_adapter, resolve_shape, spectrum_of

    per_shape: dict[tuple[int, int], str] = {}
    counts: Counter = Counter()
    with safe_open(args["input"], "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_up.weight"):
                name = key.split(".")[0]
                out = f.get_slice(key).get_shape()[0]
                inn = f.get_slice(f"{name}.lora_down.weight").get_shape()[1]
                counts[(out, inn)] += 1
                per_shape.setdefault((out, inn), name)
        timing, agreement = {}, 0.0
        for shape, name in per_shape.items():
            up = f.get_tensor(f"{name}.lora_up.weight").float()
            down = f.get_tensor(f"{name}.lora_down.weight").float()
            t0 = time.perf_counter()
            delta = up @ down
            _, s_full, _ = torch.linalg.svd(delta)
            timing[shape] = time.perf_counter() - t0
            # Equal error: the factored SVD finds the same spectrum as the full one.
            tensors = {f"{name}.{k}": f.get_tensor(f"{name}.{k}") for k in ("lora_up.weight", "lora_down.weight", "alpha")}
            layer = parse_adapter(tensors).layers[0]
            resolve_shape(layer, None, "sdxl", "bench")
            ours = spectrum_of(layer.structure()).S / layer.scale
            n = len(ours)
            agreement = max(agreement, float((ours - s_full[:n]).abs().max() / s_full[0]))
    total = sum(timing[s] * counts[s] for s in counts)
    return {
        "wall_s": total,
        "per_shape": {f"{o}x{i}": {"svd_s": timing[(o, i)], "layers": counts[(o, i)]} for (o, i) in counts},
        "max_sigma_rel_diff_vs_ours": agreement,
    }


def child_resize_lora_ranks(args: dict) -> dict:
    """resize_lora's per-layer rank, from its definition (not from our code path).

    Its spectral norm is a randomised estimate (`svd_lowrank(q=1, niter=64)`) from the global RNG, so
    two runs of resize_lora can disagree near the threshold. `seed` None draws like resize_lora does
    (unseeded); an int reseeds before each layer, which is the stream our `spectral_norm` uses."""
    import torch
    from safetensors import safe_open

    thr = args["thr"]
    kind = args["kind"]  # fro | spn
    ranks = {}
    with safe_open(args["input"], "pt") as lora, safe_open(args["base"], "pt") as base:
        for key in lora.keys():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.split(".")[0]
            alpha = lora.get_tensor(f"{name}.alpha").item()
            down = lora.get_tensor(key).float()
            up = lora.get_tensor(f"{name}.lora_up.weight").float()
            _, ru = torch.linalg.qr(up)
            _, rd = torch.linalg.qr(down.T)
            s = torch.linalg.svdvals(ru @ rd.T) * (alpha / down.shape[0])
            w = base.get_tensor(_base_key(name)).float().flatten(1)
            if kind == "spn" and args.get("seed") is not None:
                torch.manual_seed(args["seed"])
            ref = torch.linalg.matrix_norm(w, ord="fro").item() if kind == "fro" else \
                torch.svd_lowrank(w, q=1, niter=64)[1][0].item()
            ranks[name] = int(((torch.log10(s) - math.log10(ref)) > thr).sum())
    return {"ranks": ranks}


_PATHS = {lora_name(p): p for p, _, _ in sdxl_layers()}


def _base_key(name: str) -> str:
    return f"model.diffusion_model.{_PATHS[name]}.weight"


CHILDREN = {"shrink": child_shrink, "io": child_io_floor, "baseline": child_baseline, "resize_lora": child_resize_lora_ranks}


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so a child
    would report its parent's peak (the input generator's gigabytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, args: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


# The floor is short (0.1–0.2 s) and its page-cache writes vary most from run to run on this VM (one row
# once kept 0.42 s as the best of three, 0.18 s in eight later runs): it always gets at least this many.
FLOOR_TRIES = 6


def run_fresh(kind: str, args: dict, threads: int, output: str) -> dict:
    """`run_child` with no file at `output` beforehand: replacing the previous try's output would make the
    timed run also free that file's page cache (0.09–0.1 s for 162 MB here), which a job, writing a new
    output path, never pays. The shrink and its floor are treated alike."""
    Path(output).unlink(missing_ok=True)
    return run_child(kind, args, threads)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(REPO / ".lathe" / "bench-shrink"))
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="skip the resize_lora per-layer rank check")
    parser.add_argument("--device", default="cpu", help="where our shrink decomposes: cpu or cuda")
    parser.add_argument("--ranks", default="64,32", help="input ranks to run (comma list of 64, 32)")
    parser.add_argument("--tries", type=int, default=3, help="runs per warm row and per floor; the fastest is kept")
    parser.add_argument("--child")
    parser.add_argument("payload", nargs="?")
    a = parser.parse_args()
    if a.child:
        result = CHILDREN[a.child](json.loads(a.payload))
        result["max_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return 0

    work = Path(a.work)
    t0 = time.perf_counter()
    paths = generate(work)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr)
    cache = work / "norm-cache"
    os.environ["LATHE_CACHE_DIR"] = str(cache)
    for f in cache.glob("shrink-norms/*.json"):
        f.unlink()  # the first fro_ckpt run is a cold one
    lines = [
        f"Host: {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs, OMP_NUM_THREADS={a.threads}, "
        f"shrink on {a.device}, load average at start "
        f"{os.getloadavg()[0]:.1f}; generated SDXL-shaped LoRA, {len(sdxl_layers())} attention/MLP layers, fp16.",
        "",
        "Each rule's I/O floor reads the input and writes that rule's own output (safetensors `load_file` +"
        f" `save_file`, nothing else). Rows not marked cold keep the fastest of {a.tries} runs, every floor"
        f" the fastest of {max(a.tries, FLOOR_TRIES)}.",
        "",
        "| input | rule | wall s | CPU s | peak RSS MiB | MiB out | mean rank | rel. error (all layers) | worst layer "
        "| I/O floor s | × floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    ranks = [int(r) for r in a.ranks.split(",")]
    if not set(ranks) <= {64, 32}:
        parser.error(f"--ranks {a.ranks}: the generated inputs are rank 64 and 32")
    for rank in ranks:
        src = str(paths[f"lora{rank}"])
        rules = [
            ("rank", {"rank": rank // 2}, None),
            ("sv_ratio 10", {"method": "sv_ratio", "param": 10.0}, None),
            ("sv_fro 0.9", {"method": "sv_fro", "param": 0.9}, None),
            ("sv_cumulative 0.7", {"method": "sv_cumulative", "param": 0.7}, None),
            ("fro_ckpt=1,thr=-3.55 (cold norms)", {"recipe": "fro_ckpt=1,thr=-3.55"}, str(paths["base"])),
            ("fro_ckpt=1,thr=-3.55 (warm norms)", {"recipe": "fro_ckpt=1,thr=-3.55"}, str(paths["base"])),
            ("spn_ckpt=1,thr=-1.3 (cold norms)", {"recipe": "spn_ckpt=1,thr=-1.3"}, str(paths["base"])),
        ]
        for label, rule, base in rules:
            if rank != ranks[0] and "cold" in label and "fro" in label:
                continue  # the norms are already cached by the first rank's run
            out = str(work / f"out-r{rank}.safetensors")
            tries = 1 if "cold" in label else a.tries  # short runs are noisy here: keep the fastest
            job = {"input": src, "output": out, "base": base, "rule": rule, "device": a.device}
            r = min((run_fresh("shrink", job, a.threads, out) for _ in range(tries)), key=lambda x: x["wall_s"])
            copy = str(work / "io-copy.safetensors")
            io = min((run_fresh("io", {"input": src, "shrunk": out, "output": copy}, a.threads, copy)
                      for _ in range(max(a.tries, FLOOR_TRIES))), key=lambda x: x["wall_s"])
            r["floor_s"] = io["wall_s"]
            results[(rank, label)] = r
            lines.append(
                f"| rank {rank} | {label if label != 'rank' else f'--rank {rank // 2}'} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                f"{r['max_rss_mib']:.0f} | {r['mib_out']:.1f} | {r['mean_rank']:.1f} | {r['rel_error']:.4f} | "
                f"{r['max_layer_rel_error']:.4f} | {io['wall_s']:.2f} | {r['wall_s'] / io['wall_s']:.1f} |"
            )
            print(lines[-1], file=sys.stderr)

    warm = [results[(rank, "fro_ckpt=1,thr=-3.55 (warm norms)")] for rank in ranks]
    lines += ["", "Warm `fro_ckpt` against its I/O floor: " + ", ".join(
        f"rank {rank}: {r['wall_s'] / r['floor_s']:.1f}×" for rank, r in zip(ranks, warm)) + " (target: ≤ 3×)."]
    if not a.skip_reference:
        lines += ["", "resize_lora rank rule, re-derived from its definition, against ours (per-layer ranks):", ""]
    for label, kind, thr in () if a.skip_reference else (("fro_ckpt=1,thr=-3.55", "fro", -3.55),
                                                          ("spn_ckpt=1,thr=-1.3", "spn", -1.3)):
        for rank in ranks:
            warm = (rank, f"{label} (warm norms)")
            key = warm if warm in results else (rank, f"{label} (cold norms)")
            ours = results[key]["ranks"]
            ref_args = {"input": str(paths[f"lora{rank}"]), "base": str(paths["base"]), "thr": thr, "kind": kind}
            if kind == "fro":  # deterministic
                ref = run_child("resize_lora", ref_args, a.threads)["ranks"]
                same = sum(ours[n] == ref[n] for n in ref)
                lines.append(f"- rank {rank}, `{label}`: {same}/{len(ref)} layers pick the same rank")
            else:
                seeded = run_child("resize_lora", {**ref_args, "seed": 0}, a.threads)["ranks"]
                drawn = [run_child("resize_lora", ref_args, a.threads)["ranks"] for _ in range(2)]
                n = len(seeded)
                lines.append(
                    f"- rank {rank}, `{label}`: {sum(ours[k] == seeded[k] for k in seeded)}/{n} layers pick the same"
                    f" rank as resize_lora's rule drawing the same random numbers; against two unseeded runs of it"
                    f" (as resize_lora runs): {sum(ours[k] == drawn[0][k] for k in seeded)}/{n} and"
                    f" {sum(ours[k] == drawn[1][k] for k in seeded)}/{n}, while those two runs agree with each"
                    f" other on {sum(drawn[0][k] == drawn[1][k] for k in seeded)}/{n}")
            print(lines[-1], file=sys.stderr)

    if not a.skip_baseline and 64 in ranks:
        base_r = run_child("baseline", {"input": str(paths["lora64"])}, a.threads)
        ours_best = min(results[(64, k)]["wall_s"] for k in ("rank", "sv_fro 0.9", "sv_ratio 10", "sv_cumulative 0.7"))
        lines += [
            "",
            f"sd-scripts-style baseline on the rank-64 file (ΔW materialised, full `torch.linalg.svd` per layer,"
            f" one SVD per distinct shape × layer count): **{base_r['wall_s']:.0f} s**"
            f" (max σ difference vs our factored SVD: {base_r['max_sigma_rel_diff_vs_ours']:.1e} of σ₀).",
            f"Speed-up of our sd-scripts rules over it: **{base_r['wall_s'] / ours_best:.0f}×** (fastest),"
            f" {base_r['wall_s'] / max(results[(64, k)]['wall_s'] for k in ('rank', 'sv_fro 0.9', 'sv_ratio 10', 'sv_cumulative 0.7')):.0f}× (slowest).",
            "",
            "| shape (out×in) | layers | one SVD s |",
            "|---|---|---|",
        ]
        lines += [f"| {s} | {v['layers']} | {v['svd_s']:.2f} |" for s, v in base_r["per_shape"].items()]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
