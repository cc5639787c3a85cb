"""The command line's front door: --version, one example per subcommand."""
import subprocess
import sys

import pytest

from svis_ray import __version__
from svis_ray.cli import build_parser


def test_version():
    r = subprocess.run([sys.executable, "-m", "svis_ray", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"svis-ray {__version__} (ray ")


def test_every_subcommand_help_ends_with_an_example():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "predict", "config", "demo"} <= set(commands)
    for name, sub in commands.items():
        epilog = sub.epilog or ""
        assert epilog.startswith("example:") and f"svis-ray {name}" in epilog, name


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_failed_command_leaves_a_ray_it_did_not_start_running(ray_local, tmp_path):
    """The CLI shuts Ray down on an error only when it started it: a caller's (here the test
    session's, with its fake GPUs) keeps running for what comes next."""
    import ray

    from svis_ray.cli import main

    assert main(["check-data", str(tmp_path), str(tmp_path / "missing.json")]) == 2
    assert ray.is_initialized() and ray.cluster_resources().get("GPU") == 2
