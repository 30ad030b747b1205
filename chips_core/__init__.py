"""CHIPS Studio core: curvature-aware influence scoring of image-text pairs for CLIP CPT."""

__version__ = "0.1.0"
