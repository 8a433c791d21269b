"""The MaskSAM network, its backbones and model folders."""
from .backbones import BACKBONE_NAMES, Backbone, load_backbone
from .masksam import MaskSAM, MaskSAMConfig, semantic_probabilities

__all__ = ["BACKBONE_NAMES", "Backbone", "load_backbone", "MaskSAM", "MaskSAMConfig", "semantic_probabilities"]
