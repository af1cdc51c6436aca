"""`python -m trainer inspect FILE`: an adapter file's metadata and a summary of its keys as JSON.

The summary says what a loader will see: modules per prefix (UNet, text encoders), the algorithm
the tensor suffixes reveal, ranks and alphas, dtypes, and all-zero tensors (fp16 underflow).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

# Tensor suffixes that identify each LyCORIS / sd-scripts algorithm, most specific first.
ALGO_SUFFIXES = [
    ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    ("lokr", ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")),
    ("glora", ("a1.weight", "a2.weight", "b1.weight", "b2.weight")),
    ("oft", ("oft_blocks", "oft_diag")),
    ("ia3", ("on_input",)),
    ("full", ("diff", "diff_b")),
    ("norm", ("w_norm", "b_norm")),
    ("lora", ("lora_down.weight", "lora_up.weight")),
]
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")


def module_algo(suffixes: set[str]) -> str:
    for algo, marks in ALGO_SUFFIXES:
        if suffixes & set(marks):
            return algo
    return "ia3" if "weight" in suffixes else "unknown"


def summarize(path: str) -> dict:
    """The summary of `path`; ValueError naming the file when it is not a complete safetensors file."""
    from safetensors import SafetensorError, safe_open

    from trainer.models.adapter_file import read_header, zero_tensor_names

    header = read_header(path)
    try:  # safetensors checks the whole header (entries, offsets, the file's length) before any tensor is read
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or damaged: "
                         "copy or download it again") from None
    metadata = dict(header.pop("__metadata__", None) or {})
    modules: dict[str, set[str]] = {}
    dtypes: Counter = Counter()
    for key, info in header.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, set()).add(suffix)
        dtypes[info["dtype"]] += 1
    per_prefix: Counter = Counter()
    algos: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    for name, suffixes in modules.items():
        per_prefix[next((p.rstrip("_") for p in PREFIXES if name.startswith(p)), "other")] += 1
        algos[module_algo(suffixes)] += 1
        if "lora_down.weight" in suffixes:
            ranks[int(tensors[f"{name}.lora_down.weight"].shape[0])] += 1
        if "alpha" in suffixes:
            alphas[float(tensors[f"{name}.alpha"].float())] += 1
    zeros = zero_tensor_names(tensors)
    return {
        "file": path,
        "metadata": metadata,
        "tensors": len(header),
        "modules": len(modules),
        "modules_per_prefix": dict(sorted(per_prefix.items())),
        "algo": algos.most_common(1)[0][0] if algos else None,
        "algos": dict(algos),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "dtypes": dict(dtypes),
        "zero_tensors": len(zeros),
        "zero_tensor_names": zeros[:50],
        "sd_scripts_sdxl_names": any(n.startswith("lora_unet_input_blocks") or n.startswith("lora_unet_output_blocks")
                                     for n in modules),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer inspect",
                                     description="Print an adapter file's metadata and key summary as JSON.")
    parser.add_argument("file", help="a .safetensors adapter file")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.file)
    except (OSError, ValueError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    json.dump(summary, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
