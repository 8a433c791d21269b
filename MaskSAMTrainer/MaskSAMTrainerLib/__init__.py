"""MaskSAMTrainer's logic that needs MRML but no Qt (tested with slicer-core)."""
