"""MinVIS / Mask2Former per-frame model, presets and checkpoint loading."""
from svis_ray.model.checkpoint import load_checkpoint, load_pretrained, map_detectron2_key, save_checkpoint
from svis_ray.model.minvis import PRESETS, MinVIS, ModelConfig, build_model

__all__ = ["MinVIS", "ModelConfig", "PRESETS", "build_model", "load_checkpoint", "load_pretrained",
           "map_detectron2_key", "save_checkpoint"]
