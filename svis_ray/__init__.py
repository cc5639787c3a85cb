"""svis-ray: Ray-distributed semi-supervised video instance segmentation."""

__version__ = "0.1.0"
