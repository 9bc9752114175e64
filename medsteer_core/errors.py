"""The errors medsteer raises for bad input. All are ``ValueError`` subclasses, so callers that
already catch ``ValueError`` keep working; each message names the value seen and what to do."""

from __future__ import annotations

__all__ = ["MedSteerError", "VectorFileError", "VectorMismatchError", "UnsupportedModelError"]


class MedSteerError(ValueError):
    """Base class of every error medsteer raises on purpose."""


class VectorFileError(MedSteerError):
    """A pathology vector file is missing, corrupt, unsafe or of an unknown format."""


class VectorMismatchError(MedSteerError):
    """A pathology vector does not fit the model (hidden size or depth) or another vector."""


class UnsupportedModelError(MedSteerError):
    """The model is not a PixArt transformer that medsteer knows how to hook."""
