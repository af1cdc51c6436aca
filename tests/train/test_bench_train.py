"""The pure parts of bench/train.py: the GPU peak table, ratios against the baseline, MFU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "train.py"
_SPEC = importlib.util.spec_from_file_location("bench_train", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_train"] = bench  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(bench)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_lookup(name: str, tflops: float | None) -> None:
    assert bench.peak_bf16_tflops(name) == tflops


def _row(variant: str, it_per_s: float, mem: float, flops: int | None) -> dict:
    return {"model": "sdxl", "resolution": 1024, "batch_size": 1, "variant": variant, "it_per_s": it_per_s,
            "peak_allocated_gib": mem, "peak_reserved_gib": mem + 1, "executed_flops": flops, "warmup_s": 1.0,
            "samples_per_s": it_per_s}


def test_ratios_and_mfu_use_the_baseline_and_model_flops() -> None:
    rows = [_row("fp32", 1.0, 20.0, 10**12), _row("bf16", 4.0, 10.0, 10**12), _row("bf16+gc", 3.0, 5.0, 13 * 10**11)]
    bench.add_ratios(rows, peak_tflops=100.0)
    base, bf16, gc = rows
    assert (base["speedup_vs_baseline"], bf16["speedup_vs_baseline"], gc["speedup_vs_baseline"]) == (1.0, 4.0, 3.0)
    assert gc["memory_vs_baseline"] == 0.25
    # MFU counts model FLOPs (no recompute): 1 TFLOP × 3 it/s of 100 TFLOP/s.
    assert gc["model_flops"] == 10**12
    assert gc["mfu"] == pytest.approx(0.03)
    table = bench.markdown(rows, {"device": "cuda"})
    assert "| sdxl | 1024² | 1 | bf16+gc | 3 | 3 | 3.00× | 5.00 / 6.00 | 0.25× | 1,300 | 3 | 3.0% |" in table
    assert "against the 12 GiB target: met" in table


def test_failed_baseline_falls_back_to_the_first_row_that_ran() -> None:
    rows = [{**_row("fp32", 0, 0, None), "error": "out of memory"}, _row("bf16", 2.0, 10.0, None),
            _row("bf16+gc", 1.0, 5.0, None)]
    bench.add_ratios(rows, peak_tflops=None)
    assert rows[2]["baseline_variant"] == "bf16" and rows[2]["speedup_vs_baseline"] == 0.5
    assert "mfu" not in rows[2]
    table = bench.markdown(rows, {"device": "cuda"})
    assert "| sdxl | 1024² | 1 | fp32 | out of memory |" in table
    assert "0.50× (vs bf16)" in table


def test_profiled_rows_get_a_host_versus_device_table() -> None:
    row = _row("bf16", 1.0, 10.0, None)
    row["profile"] = {"steps": 3, "wall_s_per_step": 0.8, "device_busy_s_per_step": 0.08, "device_busy_fraction": 0.1,
                      "kernel_launches_per_step": 21000.0, "aten_calls_per_step": 38000.0,
                      "top_self_cpu_ms_per_step": [["aten::mm", 120.5]]}
    table = bench.markdown([_row("fp32", 1.0, 20.0, None), row], {"device": "cuda"})
    assert "| sdxl | 1024² | 1 | bf16 | 0.800 | 0.080 | 10% | 21,000 | 38,000 | `aten::mm` 120.5 |" in table
    assert table.count("profiled s/step") == 1  # one table, for the profiled row only


def test_row_summary_keeps_a_cut_off_runs_figures_in_its_log() -> None:
    row = {**_row("bf16", 1.9, 14.07, 15 * 10**12), "setup_s": 61.2, "process_s": 84.0,
           "profile": {"steps": 3, "wall_s_per_step": 0.5, "aten_calls_per_step": 38000.0,
                       "top_self_cpu_ms_per_step": [["aten::mm", 12.5]], "device_busy_s_per_step": 0.21,
                       "device_busy_fraction": 0.42, "kernel_launches_per_step": 12345.0}}
    line = bench.row_summary(row)
    assert line == ("1.9 it/s, setup 61 s, warm-up 1.0 s, process 84 s, peak 14.07 / 15.07 GiB, "
                    "15,000 GFLOP/step, device busy 42%, 12,345 launches/step")
    assert bench.row_summary({"error": "out of memory"}) == "FAILED (out of memory)"
    text = bench.report([row], {"device": "cuda", "device_name": "NVIDIA H200", "torch": "2.11", "cpus": 16,
                                "omp_num_threads": "1", "load_average": 0.0, "command": "bench/train.py",
                                "peak_bf16_tflops": 989.0, "module": "networks.lora", "dim": 32, "alpha": 16.0,
                                "steps": 10, "warmup": 3})
    assert text.startswith("`bench/train.py` — NVIDIA H200, torch 2.11; LoRA `networks.lora` dim 32 alpha 16")
    assert "| sdxl | 1024² | 1 | bf16 |" in text
