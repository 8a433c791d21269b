"""MaskSAM: prompt-free organ segmentation of CT and MR volumes with Segment Anything.

Python API::

    from masksam_core import load_model, segment
    model, card = load_model("path/to/model_folder")
    labelmap, info = segment(sitk_image, model, card)

The command-line doors are ``python -m masksam_core.predict``, ``.train``, ``.evaluate``, ``.model`` and
``.sample_data``. This package never imports Slicer.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "segment", "InferenceOptions", "__version__"]


def __getattr__(name):  # lazy: importing the package must not import torch
    if name == "load_model":
        from .model.folder import load_model

        return load_model
    if name == "segment":
        from .inference.engine import segment

        return segment
    if name == "InferenceOptions":
        from .inference.engine import InferenceOptions

        return InferenceOptions
    raise AttributeError(name)
