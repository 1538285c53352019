"""The one family of user-facing errors.

Everything the user can cause (a wrong config value, a missing or mismatched checkpoint, an unreadable dataset, a bad
sampling argument) raises a subclass of :class:`VFMTokError`. The command line prints these as one clear line; any
other exception is a bug (or an environment failure such as CUDA running out of memory) and keeps its traceback.

Each subclass also derives from the built-in exception a Python user would expect (``ValueError`` for a bad value,
``FileNotFoundError`` for a missing file, ...), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["VFMTokError", "InvalidValueError", "ConfigError", "CheckpointError", "MissingFileError",
           "OutputExistsError", "WeightsUnavailableError", "DiskFullError",
           "OutputWriteError", "MissingDependencyError"]


class VFMTokError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class InvalidValueError(VFMTokError, ValueError):
    """An argument, config value, tensor shape or dataset content is not what was expected."""


class ConfigError(InvalidValueError):
    """A config file or section is malformed: an unknown section or key, or a value of the wrong type."""


class CheckpointError(InvalidValueError):
    """A checkpoint or saved model cannot be read or does not match the model (missing, unexpected or mis-shaped
    weights, a file that is not a state dict, a pickle that ``weights_only=True`` refuses)."""


class MissingFileError(VFMTokError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class OutputExistsError(VFMTokError, FileExistsError):
    """An output location already holds something that must not be overwritten."""


class WeightsUnavailableError(VFMTokError, RuntimeError):
    """Pretrained weights (LPIPS, a discriminator's ViT, a VFM) can neither be found locally nor downloaded."""


class DiskFullError(VFMTokError, OSError):
    """The file system ran out of space (or quota) while writing an output; the partial output was removed."""


class OutputWriteError(VFMTokError, OSError):
    """The operating system refused to write an output (permission denied, a read-only or pseudo file system): not
    a full disk, which is a :class:`DiskFullError`."""


class MissingDependencyError(VFMTokError, ImportError):
    """An optional dependency (an extra such as ``vfmtok[demo]``) is not installed; the message says how to install
    it."""
