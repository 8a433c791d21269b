"""MaskSAMSegment's logic that needs MRML but no Qt, so that it runs (and is tested) with slicer-core alone."""
