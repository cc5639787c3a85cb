"""Small file helpers shared by every module: strict JSON reading and atomic writes.

Atomic writes (temp file + rename) guarantee that a failed command never leaves a partial
output file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from svis_ray.errors import SvisError


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Load a JSON file, turning every failure into a one-line ``SvisError``."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SvisError(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise SvisError(f"{p}: expected a {what}, found a directory") from None
    except json.JSONDecodeError as e:
        raise SvisError(f"{p}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise SvisError(f"{p}: not a UTF-8 text file ({e.reason})") from None
    except OSError as e:
        raise SvisError(f"{p}: cannot read {what}: {e.strerror}") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dst)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON atomically (never a half-written file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
    return Path(path)
