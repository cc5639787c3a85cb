import sys

from svis_ray.cli import main

sys.exit(main())
