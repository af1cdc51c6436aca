"""Bad files and arguments given to the trainer's command-line tools (`python -m trainer inspect|shrink`):
each ends with a one-line message naming the file or option and exit code 2 (the CLI's usage/input
convention), never a traceback; shrink's usage errors are found before torch is imported."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.badinput.badinput_helpers import LEAK_MARKERS

REPO = Path(__file__).resolve().parents[2]


def _safetensors(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD_HEADER = {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
               "lora_unet_x.lora_up.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}
GOOD = _safetensors(GOOD_HEADER, b"\0" * 32)

# (id, the file's bytes, words the message must hold)
INSPECT_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    ("truncated-data", lambda: GOOD[:-5], "it may be truncated or damaged"),
    ("truncated-to-the-header", lambda: GOOD[:-32], "it may be truncated or damaged"),
    ("header-is-a-list", lambda: _safetensors([1, 2]), "not a readable safetensors file"),
    ("entry-is-a-number", lambda: _safetensors({"a": 5}), "not a readable safetensors file"),
    ("offsets-past-the-end", lambda: _safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, b"\0" * 16), "not a readable safetensors file"),
    ("four-bytes", lambda: b"\xff" * 4, "not a safetensors file"),
]


@pytest.mark.parametrize("case, build, words", INSPECT_CASES, ids=[c[0] for c in INSPECT_CASES])
def test_inspect_names_a_bad_file_and_exits_2(tmp_path, capsys, case, build, words):
    from trainer.tools.inspect import main

    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(build())
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and str(path) in captured.err and words in captured.err, captured.err
    for marker in LEAK_MARKERS:
        assert marker not in captured.err, captured.err


def test_inspect_still_reads_a_good_file(tmp_path, capsys):
    from trainer.tools.inspect import main

    (tmp_path / "a.safetensors").write_bytes(GOOD)
    assert main([str(tmp_path / "a.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == {"2": 1}


# (id, shrink arguments after IN -o OUT, words the message must hold)
SHRINK_USAGE_CASES: list[tuple[str, list[str], str]] = [
    ("rank-zero", ["--rank", "0"], "--rank must be ≥ 1"),
    ("rank-negative", ["--rank", "-3"], "--rank must be ≥ 1"),
    ("method-without-param", ["--method", "sv_fro"], "--method sv_fro needs --param"),
    ("method-param-zero", ["--method", "sv_ratio", "--param", "0"], "needs --param > 0"),
    ("max-rank-zero", ["--rank", "4", "--max-rank", "0"], "--max-rank must be ≥ 1"),
    ("param-without-method", ["--rank", "4", "--param", "0.5"], "--param is only used with --method"),
    ("recipe-unknown-key", ["--recipe", "frob=1,thr=-3"], "unknown key 'frob'"),
    ("recipe-without-threshold", ["--recipe", "fro_ckpt=1"], "thr=X"),
    ("recipe-needs-base", ["--recipe", "fro_ckpt=1,thr=-3"], "--base"),
]
_PROBE = ("import sys; from trainer.__main__ import main; rc = main(sys.argv[1:]); "
          "print(rc, [m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules])")


@pytest.mark.parametrize("case, args, words", SHRINK_USAGE_CASES, ids=[c[0] for c in SHRINK_USAGE_CASES])
def test_shrink_usage_errors_exit_2_before_torch_is_imported(tmp_path, case, args, words):
    adapter = tmp_path / "in.safetensors"
    adapter.write_bytes(GOOD)
    out = tmp_path / "out.safetensors"
    run = subprocess.run([sys.executable, "-c", _PROBE, "shrink", str(adapter), "-o", str(out), *args],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "2 []", (run.stdout, run.stderr)
    assert run.stderr.startswith("error: ") and words in run.stderr, run.stderr
    for marker in LEAK_MARKERS:
        assert marker not in run.stderr, run.stderr
    assert not out.exists()


def test_shrink_usage_errors_exit_2_through_python_m_trainer(tmp_path):
    """The same through the real entry point, as a user types it."""
    run = subprocess.run([sys.executable, "-m", "trainer", "shrink", str(tmp_path / "in.safetensors"), "-o",
                          str(tmp_path / "o.safetensors"), "--method", "sv_fro"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "needs --param" in run.stderr, (run.returncode, run.stderr)
