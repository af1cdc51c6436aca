"""Publishing a run's outputs: files first, `metadata.json` last as the commit marker.

A reader that sees `output/metadata.json` may trust every file it lists (name, size, sha256). A failed
run removes what it already uploaded unless the spec asks to keep it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import msgspec

from trainer.core.jobkeys import METADATA_NAME
from trainer.core.jobdir import sha256_file, with_retries
from trainer.core.status import OutputFile
from trainer.core.storage import StorageError, Store

log = logging.getLogger("lathe.publish")


@dataclass(frozen=True)
class LocalOutput:
    path: str   # local file
    name: str   # key relative to the output location, e.g. "last.safetensors", "samples/000100/0.png"
    kind: str   # adapter | adapter_shrunk | adapter_epoch | adapter_step | sample | plot | config | log


class Publisher:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.uploaded: list[str] = []

    def upload(self, item: LocalOutput) -> OutputFile:
        size = os.path.getsize(item.path)
        digest = sha256_file(item.path)
        with_retries(lambda: self.store.upload_file(item.path, item.name), what=f"uploading {item.name}")
        self.uploaded.append(item.name)
        return OutputFile(name=item.name, uri=self.store.uri(item.name), size=size, sha256=digest, kind=item.kind)

    def commit(self, metadata: dict, outputs: list[OutputFile]) -> OutputFile:
        """Write metadata.json listing `outputs`: from now on the output set is complete. Returns
        metadata.json's own entry (kind "metadata"), which status.json lists so clients can pull it."""
        document = {**metadata, "outputs": [msgspec.to_builtins(o) for o in outputs]}
        body = msgspec.json.format(msgspec.json.encode(document), indent=2)
        with_retries(lambda: self.store.put_bytes(METADATA_NAME, body, content_type="application/json"),
                     what="writing metadata.json")
        self.uploaded.append(METADATA_NAME)
        return OutputFile(name=METADATA_NAME, uri=self.store.uri(METADATA_NAME), size=len(body),
                          sha256=hashlib.sha256(body).hexdigest(), kind="metadata")

    def remove_partial(self) -> None:
        """Undo a failed run's uploads (metadata.json first, so nobody trusts a half set)."""
        for name in sorted(self.uploaded, key=lambda n: n != METADATA_NAME):
            try:
                self.store.delete(name)
            except StorageError as exc:
                log.warning("could not remove partial output %s: %s", name, exc)
        self.uploaded.clear()
