"""The atlas prior: where the organs are in a new scan, from labelled cases registered onto it.

A model trained on few subjects cannot learn where organs lie in another body; registering the labelled cases (the
model folder's ``atlas/``) onto the scan answers that without learning, and SAM's decoder, prompted with the
registered organs' boxes and masks, outlines them on the scan itself.

- ``store.py``: the atlas in a model folder (compact cases, their provenance);
- ``registration.py``: atlas-to-scan registration (SimpleITK: initialisation, affine, demons) and its quality;
- ``prior.py``: the registered labels on the engine's grid, and the prompts they give each slab;
- ``modality.py``: the scan's modality against the modalities a model was trained on.
"""
