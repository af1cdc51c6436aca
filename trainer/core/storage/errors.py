"""What a store raises: every failure is a StorageError carrying the URI it concerns."""

from __future__ import annotations

from trainer.core.failures import EXIT_CODES, Reason


class StorageError(Exception):
    """A transport or server problem with the object store; another attempt may succeed."""

    reason = Reason.STORAGE_ERROR

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri
        self.message = message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.reason]


class NotFound(StorageError):
    """The object does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object already exists (If-None-Match: *)."""


class AccessDenied(StorageError):
    """The credentials may not do this; retrying will not help until someone changes them."""
