"""Copy a folder to or from object storage (or between any two locations) with pyarrow.fs.

    python tools/s3_copy.py demo_data s3://svis-demo/data --create-bucket   # upload
    python tools/s3_copy.py s3://svis-demo/runs/debug runs/debug-copy      # download a run folder

Endpoints and credentials come from the standard environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS
for gs://), as for training (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svis_ray import io  # noqa: E402
from svis_ray.errors import SvisError  # noqa: E402


def create_bucket(uri: str) -> None:
    """Create the bucket of an ``s3://`` URI if it does not exist (a local test server)."""
    import pyarrow.fs

    u = urlsplit(uri)
    if u.scheme != "s3":
        raise SvisError(f"{uri}: --create-bucket supports s3:// only")
    query = "&".join(q for q in (u.query, "allow_bucket_creation=true") if q)
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{u.netloc}?{query}")
    try:
        fs.create_dir(u.netloc)
    except OSError as e:
        raise SvisError(f"s3://{u.netloc}: cannot create the bucket: {str(e).splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Copy a folder between local paths and object storage (pyarrow.fs).",
                                epilog="example: python tools/s3_copy.py demo_data s3://svis-demo/data --create-bucket")
    p.add_argument("src", help="local folder or URI (s3://bucket/prefix, gs://...)")
    p.add_argument("dst", help="local folder or URI")
    p.add_argument("--create-bucket", action="store_true", help="create the destination's s3 bucket first")
    a = p.parse_args(argv)
    try:
        if not io.exists(a.src):
            raise SvisError(f"{a.src}: not found")
        if a.create_bucket:
            create_bucket(a.dst)
        io.copy_tree(a.src, a.dst)
    except SvisError as e:
        print(f"s3_copy: error: {e}", file=sys.stderr)
        return 2
    print(f"copied {a.src} -> {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
