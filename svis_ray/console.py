"""What a run shows on the console: progress and, when it fails, one line.

Ray streams every worker's and actor's stdout/stderr to the driver, which prints it with a
``(Actor pid=...)`` prefix: a corrupt frame then reached the user as hundreds of lines of
tracebacks from the train workers, the split coordinator and the teacher actors. A command that
starts Ray routes that stream into a log file in its output folder instead (``route_worker_output``);
only lines that a worker tags for the console (``CONSOLE``, e.g. the training progress printed by
the Train controller) still reach the terminal, untagged. The one-line error names the log file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CONSOLE = "[svis-ray] "  # a line from a Ray worker or actor starting with this goes to the user's console
LOG_NAME = "ray.log"  # Ray's worker output, in the run's output folder
_HANDLER = "svis_ray_worker_output"


def console_line(text: str) -> str:
    """``text`` tagged for the console, for ``print`` in a Ray worker or actor."""
    return CONSOLE + text


def log_file_for(out_dir: str | os.PathLike) -> Path:
    """Where Ray's worker output of a run writing to ``out_dir`` goes: ``out_dir/ray.log``, or the
    temp folder when ``out_dir`` is a URI (a log is appended line by line, so it stays local)."""
    if "://" in str(out_dir):
        import tempfile

        return Path(tempfile.gettempdir()) / f"svis-ray-{Path(str(out_dir)).name}-{LOG_NAME}"
    return Path(out_dir).expanduser().resolve() / LOG_NAME


def route_worker_output(log_file: Path, take_over: bool) -> Path | None:
    """From now on, write the worker output Ray streams to this driver into ``log_file`` and print
    only the lines tagged ``CONSOLE`` (untagged); returns ``log_file``, or None when the stream is
    left alone. ``take_over``: replace Ray's own printing (this process started Ray); otherwise only
    an earlier run's routing is moved to the new file (a session someone else started keeps its
    console, e.g. the tests' shared Ray)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    names = [name for name, _ in dispatcher.handlers]
    if _HANDLER not in names and not (take_over and "ray_print_logs" in names):
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "a", buffering=1)  # line-buffered: the log is current when the error line names it

    def handle(batch: dict) -> None:
        who = batch.get("actor_name") or batch.get("task_name") or "worker"
        for line in batch.get("lines", []):
            out.write(f"({who} pid={batch.get('pid')}) {line}\n")
            if CONSOLE in line:
                print(line.split(CONSOLE, 1)[1], file=sys.stdout, flush=True)

    dispatcher.remove_handler("ray_print_logs")  # Ray's own: prefix and print everything
    dispatcher.remove_handler(_HANDLER)  # a previous run's in this process
    dispatcher.add_handler(_HANDLER, handle)
    return log_file


def with_log(message: str, log_file: Path | None) -> str:
    """The one-line error, naming the log with the workers' side of the story when there is one."""
    return f"{message} (Ray worker output: {log_file})" if log_file else message
