"""The synthetic demo families, by name: ``svis-ray demo-data --family NAME`` and
``svis-ray benchmark --family NAME``.

``shapes`` (svis_ray/data/demo.py) is the default family, the one ``svis-ray demo`` and the
recipe defaults were made on; ``creatures`` (svis_ray/data/creatures.py) was designed
separately, to check that a default also holds on data nobody tuned it to.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from svis_ray.errors import SvisError

DEFAULT_FAMILY = "shapes"


def generators() -> dict[str, Callable[..., dict[str, Any]]]:
    """Family name -> ``make_*_data(out, videos=, frames=, size=, seed=, val_videos=)``."""
    from svis_ray.data.creatures import make_creatures_data
    from svis_ray.data.demo import make_demo_data

    return {"shapes": make_demo_data, "creatures": make_creatures_data}


FAMILIES = ("shapes", "creatures")


def make_family_data(family: str, out: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Write family ``family``'s dataset to ``out``; ``kwargs`` as the family's generator takes them."""
    makers = generators()
    if family not in makers:
        raise SvisError(f"--family: unknown demo family {family!r}; choose from {', '.join(makers)}")
    return makers[family](out, **kwargs)
