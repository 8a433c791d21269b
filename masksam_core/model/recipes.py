"""Architecture presets for the two training recipes.

- ``gpu`` (the spec's recipe): learned conv3d stem, depth adapters and slice embedding in the image encoder,
  decoder depth adapters, refinement head. Training back-propagates through the (frozen) encoder.
- ``cpu`` (fits 2 CPU cores): repeat stem and no trainable part inside the encoder, so encoder features
  depend on each slice alone and can be computed once and cached; decoder depth adapters, prompt generator,
  classifier tokens and class head are trained. No refinement head: it mixes queries, which would make
  skipping empty queries at inference lossy.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .masksam import MaskSAMConfig

RECIPES = ("cpu", "gpu")


def architecture_for_recipe(recipe: str, num_classes: int, slab_depth: int = 8, num_queries: int = 16,
                            prompt_channels: Optional[Sequence[int]] = None,
                            adapter_mode: str = "unpartitioned") -> MaskSAMConfig:
    """The :class:`MaskSAMConfig` of ``recipe`` for C = ``num_classes`` (background included)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {recipe!r}")
    gpu = recipe == "gpu"
    return MaskSAMConfig(
        num_classes=num_classes, slab_depth=slab_depth, num_queries=num_queries,
        stem="conv3d" if gpu else "repeat", encoder_adapters=gpu, encoder_depth_embedding=gpu,
        adapter_mode=adapter_mode, decoder_adapters=True, refine_head=gpu,
        prompt_channels=list(prompt_channels) if prompt_channels else None,
    )
