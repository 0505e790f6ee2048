"""The engine's error hierarchy: every failure a caller may need to tell apart, with fields."""
from __future__ import annotations


class StemsError(Exception):
    """Base of every error this project raises on purpose.

    `retryable` tells the worker whether trying again can help (storage hiccups) or not
    (corrupt audio, a missing model); `code` is a stable machine-readable name.
    """

    code = "stems_error"
    retryable = False

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **{k: v for k, v in self.fields.items() if v is not None}}


class AudioError(StemsError):
    """The audio cannot be decoded or is outside what we accept (retrying will not help)."""

    code = "invalid_audio"


class PresetError(StemsError):
    """Unknown preset, or a request the preset cannot serve."""

    code = "invalid_preset"


class ModelNotInstalled(StemsError):
    """A model a chain needs has no weights in the model store."""

    code = "model_not_installed"


class ChecksumMismatch(StemsError):
    """A weight file's sha256 differs from the one pinned in the manifest."""

    code = "checksum_mismatch"


class ChainError(StemsError):
    """A chain whose steps do not connect; raised when the catalogue is built."""

    code = "invalid_chain"


class Cancelled(StemsError):
    """The job was cancelled while it ran; raised between chunks."""

    code = "cancelled"
