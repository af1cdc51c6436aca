"""What an adapter's safetensors header tells at submit, read with two ranged GETs (no torch, no download).

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every
tensor (dtype, shape) plus `__metadata__`. From it the service can tell that a file is not an adapter
at all (a checkpoint, a random file) and which architecture family an adapter was trained for (SDXL
names its text encoders `lora_te1_`/`lora_te2_` and its UNet layers after the SGM layout; SD1/SD2 use
`lora_te_` and diffusers' names). Layer shapes against the base are checked by the trainer, which
fails the job with `adapter_mismatch` naming the file and the layer.
"""

from __future__ import annotations

import json
import struct

from service.api.wire import FieldProblem
from trainer.core.storage import NotFound, Store

MAX_HEADER_BYTES = 16 * 1024 * 1024  # real adapter headers are well under 1 MiB
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def read_header(store: Store, key: str) -> dict | str:
    """The parsed header, or a sentence saying why there is none."""
    try:
        head = store.get_range(key, 0, 8)
    except NotFound:
        return "no such object; upload the adapter there first"
    if len(head) < 8:
        return "is shorter than a safetensors header: not a .safetensors file"
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        return f"declares a {length}-byte header: not a .safetensors adapter file"
    try:
        header = json.loads(store.get_range(key, 8, length))
    except (UnicodeDecodeError, ValueError):
        return "has no readable safetensors JSON header: not a .safetensors file"
    return header if isinstance(header, dict) else "has a header that is not a JSON object"


def family(header: dict) -> str | None:
    """'sdxl' or 'sd1/sd2' from the key names, None when they do not say."""
    names = [k.split(".", 1)[0] for k in header if k != "__metadata__"]
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
                         "lora_unet_middle_block_")) for n in names):
        return "sdxl"
    if any(n.startswith(("lora_te_", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
           for n in names):
        return "sd1/sd2"
    return None


def adapter_problems(field: str, uri: str, header: dict | str, arch: str) -> list[FieldProblem]:
    if isinstance(header, str):
        return [FieldProblem(path=field, message=f"{uri} {header}")]
    keys = [k for k in header if k != "__metadata__"]
    if not any(k.startswith(LORA_PREFIXES) for k in keys):
        first = keys[0] if keys else "none"
        return [FieldProblem(path=field, message=(
            f"{uri} is not an sd-scripts/LyCORIS adapter: no key starts with lora_unet_/lora_te*_ (first key: "
            f"{first}); give the adapter file, not a checkpoint"))]
    found = family(header)
    wanted = "sdxl" if arch == "sdxl" else "sd1/sd2"
    if found is not None and found != wanted:
        return [FieldProblem(path=field, message=(
            f"{uri} is an adapter for {found.upper()} (its layer names say so) but model.arch is {arch!r}; "
            "use a base model of its own architecture"))]
    return []
