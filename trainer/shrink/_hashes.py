"""sd-scripts' `sshs_model_hash` / `sshs_legacy_hash` (train_util.precalculate_safetensors_hashes).

Both hash the file sd-scripts would write with only the `ss_*` metadata: the model hash is the sha256 of
everything after the header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at
offset 1 MiB. Kept here until `trainer.adapter_file.sshs_hashes` exists (the lead dedupes).
"""

from __future__ import annotations

import hashlib

import safetensors.torch
from torch import Tensor


def sshs_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, training_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(data)[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def modelspec_sha256(tensors: dict[str, Tensor]) -> str:
    """`modelspec.hash_sha256` as sd-scripts' sai_model_spec computes it: tensor by tensor."""
    digest = hashlib.sha256()
    for tensor in tensors.values():
        data = safetensors.torch.save({"tensor": tensor})
        header_len = int.from_bytes(data[:8], "little")
        digest.update(memoryview(data)[8 + header_len :])
    return f"0x{digest.hexdigest()}"
