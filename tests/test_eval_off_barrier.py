"""Held-out evaluation off the training barrier (issue 24.6): rank 0 picks up finished validation
tasks at later reports; the trainer gets Ray Train's validation hook only for periodic evaluation.
(The end-to-end path, TensorBoard pictures and best.pt included, is tests/test_pipeline.py's debug run.)"""
import types

import pytest
from ray.train import Checkpoint
from ray.train.v2.api.reported_checkpoint import ReportedCheckpoint, ReportedCheckpointStatus as Status

from svis_ray.config import load_config
from svis_ray.demo_job import DEBUG_CONFIG


def _reported(path: str, step: int, status: Status, ap: float | None = None) -> ReportedCheckpoint:
    metrics = {"step": step, "val_AP": -1.0, "val_step": -1, "loss": 1.0}  # as rank 0 reported it
    if ap is not None:
        metrics.update(val_AP=ap, val_AP50=ap + 0.1)  # merged in by the validation task
    return ReportedCheckpoint(checkpoint=Checkpoint(path), metrics=metrics, status=status)


def test_finished_validations_reach_a_later_report(monkeypatch, tmp_path):
    import ray.train

    from svis_ray.train import Reporter

    cfg = load_config(DEBUG_CONFIG, [f"output.dir={tmp_path}", "data.val_json=''"])
    reporter = Reporter(cfg, 0, ["a"])
    state = types.SimpleNamespace(best_ap=0.2)
    answers = [[_reported("/r/c5", 5, Status.PENDING_VALIDATION)],
               [_reported("/r/c5", 5, Status.VALIDATED, 0.3), _reported("/r/c10", 10, Status.VALIDATED, 0.25)],
               [_reported("/r/c5", 5, Status.VALIDATED, 0.3), _reported("/r/c10", 10, Status.VALIDATED, 0.25)]]
    calls = []

    def fake(consistency_mode, timeout_s):
        calls.append((consistency_mode.value, timeout_s))
        return answers[len(calls) - 1]

    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", fake)
    assert reporter.validated(state) == {}  # nothing handed to a validation task: no controller call
    assert calls == []
    reporter.pending = 2
    assert reporter.validated(state) == {}  # still running
    got = reporter.validated(state)
    # the newest result, the step it belongs to, both pictures; the best AP follows
    assert got == {"val_AP": 0.25, "val_AP50": pytest.approx(0.35), "val_step": 10,
                   "val_pictures": [[5, "/r/c5"], [10, "/r/c10"]]}
    assert state.best_ap == 0.3 and reporter.pending == 0
    reporter.pending = 1
    assert reporter.validated(state, wait=True) == {}  # each result is reported once
    assert [c[0] for c in calls] == ["COMMITTED", "COMMITTED", "VALIDATED"] and calls[-1][1] is None


def test_validation_hook_only_for_periodic_evaluation(tmp_path):
    from svis_ray.train import validate_checkpoint, validation_config

    periodic = load_config(DEBUG_CONFIG, [f"output.dir={tmp_path}", "train.eval_every=100",
                                          "train.eval_resources={CPU: 2, GPU: 1, teacher_node: 1}"])
    hook = validation_config(periodic)
    assert hook.fn is validate_checkpoint
    assert hook.ray_remote_kwargs == {"num_cpus": 2.0, "num_gpus": 1.0, "resources": {"teacher_node": 1.0},
                                      # out of a Tune trial's placement group (it would wait forever)
                                      "max_retries": 0, "scheduling_strategy": "DEFAULT"}
    assert hook.task_config.fn_kwargs["config"]["data"]["val_json"] == "val.json"
    assert validation_config(load_config(DEBUG_CONFIG, [f"output.dir={tmp_path}"])) is None  # eval_every 0
    assert validation_config(load_config(DEBUG_CONFIG, [f"output.dir={tmp_path}", "train.eval_every=100",
                                                        "data.val_json=''"])) is None
