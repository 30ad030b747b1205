"""CHIPS Studio core: curvature-aware influence scoring of image-text pairs for CLIP continual pre-training."""

__version__ = "0.1.0"
