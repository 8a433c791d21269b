"""User-facing errors.

Every problem a user can cause (a missing file, a 2D image, a checkpoint for
another backbone...) is raised as :class:`MaskSAMError` (or a subclass) with a
one-line message naming the problem. The command-line doors catch it, print
``error: <message>`` and exit with code 2, without a traceback. Any other exception
is a bug, not the user's doing: the doors print one line naming it and the log file
that holds its traceback (``cli_util.run_cli``), and exit with code 1.
"""
from __future__ import annotations


class MaskSAMError(Exception):
    """A problem with the user's input, files or settings (exit code 2)."""


class InputError(MaskSAMError):
    """An input image, label map or dataset cannot be used."""


class ModelError(MaskSAMError):
    """A model folder, model card or checkpoint cannot be used."""


class OutputError(MaskSAMError):
    """An output cannot be written (exists, not writable...)."""


class MaskSAMWarning(UserWarning):
    """Something the user should know about a result (a modality the model was not trained on, a registration
    that failed): the result is still written, and the warning is in its sidecar."""
