"""MinVIS / Mask2Former per-frame model, presets, input preprocessing and checkpoint loading."""
from svis_ray.model.checkpoint import (load_checkpoint, load_model, load_pretrained, map_detectron2_key,
                                      save_checkpoint)
from svis_ray.model.minvis import PRESETS, MinVIS, ModelConfig, build_model, preprocess, preprocess_frames

__all__ = ["MinVIS", "ModelConfig", "PRESETS", "build_model", "load_checkpoint", "load_model", "load_pretrained",
           "map_detectron2_key", "preprocess", "preprocess_frames", "save_checkpoint"]
