"""`python -m trainer shrink IN.safetensors -o OUT …`: the standalone shrink tool.

Arguments are checked before torch is imported; diffusers/transformers are never imported.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer.core.precision import SAVE_PRECISIONS
from trainer.core.shrink_choice import SHRINK_METHODS, make_rule
from trainer.core.shrink_errors import ShrinkError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer shrink",
        description="Exact SVD rank reduction of a LoRA / LyCORIS adapter into a plain LoRA (LoCon for convs).",
    )
    p.add_argument("input", help="adapter .safetensors (sd-scripts / LyCORIS key naming)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--base", help="base model: SGM single-file .safetensors or diffusers folder (recipes need it)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="fixed rank for every layer (sd-scripts --new_rank)")
    how.add_argument(
        "--method", choices=SHRINK_METHODS,
        help="sd-scripts --dynamic_method; the _legacy names: the off-by-one form before sd-scripts PR #2194",
    )
    how.add_argument("--recipe", help="resize_lora recipe, e.g. 'fro_ckpt=1,thr=-3.55' (needs --base)")
    p.add_argument("--param", type=float, help="sd-scripts --dynamic_param for --method")
    p.add_argument("--max-rank", type=int, help="cap on every layer's rank (default: the layer's own rank)")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS, help="default: the input's precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--plot", metavar="PNG", help="draw rank kept and retained energy per layer")
    p.add_argument("--report", metavar="JSON", help="also write the shrink report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _summary(report) -> str:
    t = report.totals
    ranks = [r.new_rank for r in report.layers if r.new_rank]
    lines = [
        f"{report.input} -> {report.output}",
        f"  layers: {t.layers_out}/{t.layers_in} kept ({t.layers_omitted} omitted), {t.passthrough_keys} passed through",
        f"  size: {t.bytes_in / 2**20:.2f} MiB -> {t.bytes_out / 2**20:.2f} MiB",
        f"  rank kept: min {min(ranks)}, max {max(ranks)}, mean {sum(ranks) / len(ranks):.1f}",
        f"  retained Frobenius {t.retained_fro:.4f}, relative error {t.rel_error:.4f} (worst layer {t.max_rel_error:.4f})",
        f"  time: {report.timings_s.get('total', 0.0):.2f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.param is not None and args.method is None:
        print("error: --param is only used with --method", file=sys.stderr)
        return 2
    try:  # usage errors exit 2 before torch is imported, as argparse's own do
        rule = make_rule(args.rank, args.method, args.param, args.recipe, args.max_rank)
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rule.recipe is not None and rule.recipe.needs_base and not args.base:
        print(f"error: recipe '{args.recipe}' compares against the base model: pass --base CHECKPOINT", file=sys.stderr)
        return 2
    from .pipeline import shrink_file  # torch is imported only past argument checks

    try:
        report = shrink_file(
            args.input,
            args.output,
            base=args.base,
            rank=args.rank,
            method=args.method,
            param=args.param,
            recipe=args.recipe,
            max_rank=args.max_rank,
            save_precision=args.save_precision,
            device=args.device,
            plot_path=args.plot,
        )
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    if not args.quiet:
        print(_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
