"""A failed run reads as one line: user errors are not retried, Ray's worker output goes to a log file."""
import pytest

from svis_ray.errors import SvisError


def test_a_user_error_fails_the_run_at_once_a_real_fault_is_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from svis_ray.train import UserErrorFailurePolicy

    policy = UserErrorFailurePolicy(DefaultFailurePolicy(FailureConfig(max_failures=2)))
    bad_frame = SvisError("/data/JPEGImages/v1/00002.jpg: not a decodable image")
    user = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(bad_frame, "Traceback ...")})
    assert policy.make_decision(user) == FailureDecision.RAISE
    fault = WorkerGroupError("rank 1 died", {1: RuntimeError("The actor died unexpectedly")})
    assert [policy.make_decision(fault) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]


@pytest.fixture
def dispatcher():
    """Ray's worker-output dispatcher with a stand-in for the handler ray.init installs, restored after."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as d

    saved = list(d.handlers)
    printed = []
    d.add_handler("ray_print_logs", printed.append)
    yield d, printed
    d.handlers = saved


def test_worker_output_goes_to_the_log_and_only_console_lines_print(dispatcher, tmp_path, capsys):
    from svis_ray.console import console_line, log_file_for, route_worker_output, with_log

    d, printed = dispatcher
    log = log_file_for(tmp_path / "run")
    assert route_worker_output(log, take_over=False) is None  # someone else's Ray: left alone
    assert route_worker_output(log, take_over=True) == log
    d.emit({"pid": 42, "actor_name": "TrainController", "is_err": False,
            "lines": [console_line("step 20/400 loss 1.234"), "Traceback (most recent call last):"]})
    assert capsys.readouterr().out == "step 20/400 loss 1.234\n" and not printed
    assert log.read_text().splitlines() == ["(TrainController pid=42) [svis-ray] step 20/400 loss 1.234",
                                            "(TrainController pid=42) Traceback (most recent call last):"]
    assert with_log("x.jpg: bad", log) == f"x.jpg: bad (Ray worker output: {log})"
    # a second run in the same process moves the routing to its own folder
    assert route_worker_output(tmp_path / "b" / "ray.log", take_over=False) == tmp_path / "b" / "ray.log"


def test_a_trial_reporting_a_user_error_stops_the_whole_sweep():
    from svis_ray.tuning import USER_ERROR, _user_error_stopper

    stop = _user_error_stopper()
    assert not stop("t1", {"step": 4, "val_AP": 0.1}) and not stop.stop_all()
    assert stop("t2", {USER_ERROR: "x.jpg: not a decodable image", "step": 0}) and stop.stop_all()
