"""Why a model cannot be had: not installed, wrong bytes, or damaged files (no torch here)."""
from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """The model (or a part of the default model) is not on this machine."""


class ChecksumError(ValueError):
    """The assembled default model does not match its published sha256."""


class DamagedModelError(ValueError):
    """A model folder's file is truncated, unreadable or does not match its recorded checksum."""
