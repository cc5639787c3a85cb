"""The command line's front door: --version, one example per subcommand."""
import subprocess
import sys

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
