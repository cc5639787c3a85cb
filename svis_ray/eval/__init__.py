"""YouTube-VIS evaluation: video mask AP of a CodaLab-format results.json."""
from svis_ray.eval.results import encode_masks, read_results, validate_results, write_results
from svis_ray.eval.ytvis_eval import evaluate, evaluate_files, format_table

__all__ = ["encode_masks", "evaluate", "evaluate_files", "format_table", "read_results",
           "validate_results", "write_results"]
