"""Adapter files: sshs hashes against an independent computation, zero tensors, dtypes, modelspec,
and the inspect CLI."""

from __future__ import annotations

import datetime
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.models.adapter_file import modelspec_metadata, read_metadata, save_adapter, sshs_hashes


def _tensors(big: bool = True):
    g = torch.Generator().manual_seed(0)
    out = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.full((4, 32), 1e-9),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 4, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
    }
    if big:  # > 1 MiB so the legacy hash window (64 KiB at offset 1 MiB) lies inside the data
        out["lora_unet_mid_block_attentions_0_proj_out.lora_down.weight"] = torch.randn(4, 100_000, generator=g)
    return out


def test_sshs_hashes_match_an_independent_computation(tmp_path):
    tensors = _tensors()
    metadata = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "not hashed"}
    saved = save_adapter(tensors, str(tmp_path / "a.safetensors"), metadata=metadata, dtype=torch.float32)
    header = read_metadata(saved.path)
    data = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    # Model hash: SHA-256 of everything after the header of the file on disk.
    assert header["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    # Legacy hash: 64 KiB at 1 MiB of the same tensors saved with the ss_* metadata only.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ss.safetensors"),
              metadata={"ss_network_dim": "4", "ss_output_name": "x"})
    ss_only = (tmp_path / "ss.safetensors").read_bytes()
    assert header["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert saved.sha256 == hashlib.sha256(data).hexdigest() and saved.size == len(data)
    assert header["modelspec.title"] == "not hashed"
    # Metadata outside ss_* does not change the hashes (sd-scripts keeps them stable).
    assert sshs_hashes(tensors, {"ss_network_dim": "4", "ss_output_name": "x", "other": "y"}) == (
        header["sshs_model_hash"], header["sshs_legacy_hash"])


def test_written_file_equals_safetensors_own_serialisation(tmp_path):
    """The writer swaps the header of one serialisation instead of serialising twice: the result must be
    what safetensors itself writes, apart from the header's layout."""
    tensors = {k: v.half() for k, v in _tensors().items()}
    metadata = {"ss_network_dim": "4", "lathe_report": json.dumps({"a": [1, 2]}), "modelspec.title": "é"}
    saved = save_adapter(tensors, str(tmp_path / "ours.safetensors"), metadata=metadata, dtype="fp16")
    header = read_metadata(saved.path)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=header)
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    (n_ours,), (n_ref,) = struct.unpack("<Q", ours[:8]), struct.unpack("<Q", ref[:8])
    assert n_ours % 8 == 0  # the data buffer stays aligned
    assert ours[8 + n_ours :] == ref[8 + n_ref :]
    assert json.loads(ours[8 : 8 + n_ours]) == json.loads(ref[8 : 8 + n_ref])
    loaded = load_file(saved.path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_small_file_legacy_hash_is_the_empty_digest(tmp_path):
    saved = save_adapter(_tensors(big=False), str(tmp_path / "s.safetensors"), metadata={}, dtype="fp32")
    assert read_metadata(saved.path)["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_save_precision_and_zero_tensors(tmp_path, precision, dtype):
    saved = save_adapter(_tensors(big=False), str(tmp_path / f"{precision}.safetensors"), metadata={"ss_x": "1"},
                         dtype=precision)
    loaded = load_file(saved.path)
    assert {v.dtype for v in loaded.values()} == {dtype}
    zeros = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    if precision == "fp16":  # 1e-9 underflows in fp16, not in bf16 (wider exponent) or fp32
        zeros.insert(0, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight")
    assert saved.zero_tensors == sorted(zeros)


def test_save_refuses_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_adapter(_tensors(big=False), str(tmp_path / "x.safetensors"), metadata={"ss_network_dim": 4}, dtype="fp16")
    with pytest.raises(ValueError, match="fp8"):
        save_adapter(_tensors(big=False), str(tmp_path / "x.safetensors"), metadata={}, dtype="fp8")


def test_modelspec_metadata():
    ts = 1_700_000_000.5
    sdxl = modelspec_metadata("sdxl", False, "my lora", 1024, timestamp=ts, clip_skip=2)
    assert sdxl == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "my lora",
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.datetime.fromtimestamp(1_700_000_000).isoformat(),
        "modelspec.prediction_type": "epsilon",
        "modelspec.encoder_layer": "2",
    }
    sd2 = modelspec_metadata("sd2", True, None, None, timestamp=ts)
    assert sd2["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert sd2["modelspec.implementation"] == "diffusers" and sd2["modelspec.prediction_type"] == "v"
    assert sd2["modelspec.resolution"] == "768x768" and sd2["modelspec.title"] == f"LoRA@{ts}"
    sd1 = modelspec_metadata("sd1", False, "t", "512,768", timestamp=ts)
    assert sd1["modelspec.architecture"] == "stable-diffusion-v1/lora" and sd1["modelspec.resolution"] == "512x768"
    assert modelspec_metadata("sd2", False, "t", None, timestamp=ts)["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


def test_inspect_cli(tmp_path, capsys):
    from trainer.tools.inspect import main

    saved = save_adapter(_tensors(big=False), str(tmp_path / "a.safetensors"), metadata={"ss_network_dim": "4"},
                         dtype="fp16")
    assert main([saved.path]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metadata"]["ss_network_dim"] == "4" and report["metadata"]["sshs_model_hash"]
    assert report["modules_per_prefix"] == {"lora_te": 1, "lora_unet": 1}
    assert report["algo"] == "lora" and report["ranks"] == {"4": 2} and report["dtypes"] == {"F16": 6}
    assert report["zero_tensors"] == 2
    loha = {"lora_unet_x.hada_w1_a": torch.ones(2, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 2),
            "lora_unet_x.hada_w2_a": torch.ones(2, 2), "lora_unet_x.hada_w2_b": torch.ones(2, 2),
            "lora_unet_x.alpha": torch.tensor(1.0)}
    save_adapter(loha, str(tmp_path / "loha.safetensors"), metadata={}, dtype="fp32")
    assert main([str(tmp_path / "loha.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["algo"] == "loha"
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 4)
    assert main([str(tmp_path / "bad.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_hashes_patched_into_the_streamed_file_equal_a_whole_serialisation(tmp_path, dtype):
    """The writer streams the file with placeholder hashes and patches them in; the legacy window's place
    follows from the ss_*-only header's length, which awkward metadata (escapes, unicode) and many
    tensors change. Both hashes must equal those of a whole ss_*-only serialisation."""
    g = torch.Generator().manual_seed(3)
    tensors = {f"lora_unet_layer_{i:04d}.lora_down.weight": torch.randn(4, 700, generator=g) for i in range(400)}
    metadata = {
        "ss_training_comment": 'quote " backslash \\ newline \n tab \t bell \x07 é 日本 \u2028 done',
        "ss_tag_frequency": json.dumps({"d": {"a b": 3, "ü": 1}}),
        "modelspec.title": "not hashed \x01",
    }
    saved = save_adapter(tensors, str(tmp_path / "w.safetensors"), metadata=metadata, dtype=dtype)
    header = read_metadata(saved.path)
    cast = {k: v.to(torch.float16 if dtype == "fp16" else torch.bfloat16) for k, v in tensors.items()}
    assert (header["sshs_model_hash"], header["sshs_legacy_hash"]) == sshs_hashes(cast, metadata)
    assert saved.sha256 == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert header["ss_training_comment"] == metadata["ss_training_comment"]
    loaded = load_file(saved.path)
    assert all(torch.equal(loaded[k], cast[k]) for k in tensors)


def test_hashes_of_mixed_dtypes_read_back_from_the_written_file_equal_a_whole_serialisation(tmp_path):
    """`write_hashed` hashes the written file's data section, which safetensors orders by dtype, then by
    name. Mixed dtypes and names out of dtype order, with the legacy window (64 KiB at 1 MiB) straddling
    two tensors: both hashes must equal those of a whole serialisation."""
    from trainer.models.adapter_file import write_hashed

    g = torch.Generator().manual_seed(5)
    tensors = {
        "a_fp16.lora_down.weight": torch.randn(8, 60_000, generator=g).half(),  # ends inside the legacy window
        "b_fp32.lora_up.weight": torch.randn(3000, 8, generator=g),
        "c_bf16.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
        "d_fp64.scale": torch.randn(5, generator=g, dtype=torch.float64),
        "e_bool.on_input": torch.tensor(True),
        "f_i64.index": torch.arange(7),
        "g_fp16.lora_up.weight": torch.randn(40_000, 8, generator=g).half(),
    }
    metadata = {"ss_network_dim": "8", "ss_training_comment": "é \" \\"}
    path = tmp_path / "mixed.safetensors"
    write_hashed(tensors, path, metadata, file_sha256=False)
    header = read_metadata(str(path))
    assert (header["sshs_model_hash"], header["sshs_legacy_hash"]) == sshs_hashes(tensors, metadata)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
