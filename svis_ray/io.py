"""File access shared by every module: local paths and object-store URIs behind one small API.

A location is a local path (``runs/x``, ``/data/ytvis``) or a URI that ``pyarrow.fs`` understands
(``s3://bucket/key``, ``gs://bucket/key``, ``hdfs://host/path``). Local paths use plain file I/O,
exactly as before URIs were supported: writes are atomic (temp file + rename), so a failed
command never leaves a partial output file behind. URIs go through one ``pyarrow.fs`` filesystem
per process per scheme + bucket (``filesystem``): building one resolves credentials and the
bucket's region, far too slow for every frame read. Object stores replace an object atomically
on upload, but cannot append: ``Appender`` rewrites a small log object whole instead.

S3 endpoints and credentials come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance profile, ``AWS_DEFAULT_REGION``),
which ``pyarrow.fs.FileSystem.from_uri`` reads; GCS uses ``GOOGLE_APPLICATION_CREDENTIALS`` or
the node's service account. Every failure is a one-line ``SvisError`` naming the location.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

from svis_ray.errors import SvisError

Location = str | os.PathLike


def is_uri(path: Location | None) -> bool:
    """True for ``scheme://...`` (object stores, HDFS); ``file://`` counts as local."""
    s = str(path or "")
    return "://" in s and not s.startswith("file://")


def _local(path: Location) -> Path:
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser()


@functools.lru_cache(maxsize=None)
def _filesystem(root: str, endpoint: str | None):
    """The filesystem of ``scheme://bucket[?options]``; ``endpoint`` (AWS_ENDPOINT_URL) is part of
    the cache key only, so a process that changes it gets a new filesystem."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(root)[0]


def filesystem(location: Location):
    """``(pyarrow filesystem, path on it)`` for a local path or URI; the filesystem of a URI is
    created once per process per scheme + bucket (+ query options such as ``endpoint_override``)."""
    import pyarrow
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(_local(location).resolve())
    uri = str(location)
    u = urlsplit(uri)
    root = f"{u.scheme}://{u.netloc}" + (f"?{u.query}" if u.query else "")
    try:
        fs = _filesystem(root, os.environ.get("AWS_ENDPOINT_URL"))
    except (OSError, pyarrow.ArrowException, ValueError) as e:
        raise SvisError(f"{uri}: cannot open the file system: {_first_line(e)}") from None
    if u.scheme in ("s3", "gs", "gcs"):  # the bucket is the first component of the path
        return fs, (u.netloc + u.path).rstrip("/")
    return fs, u.path.rstrip("/") or "/"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _error(location: Location, action: str, e: BaseException, what: str = "file") -> SvisError:
    if isinstance(e, FileNotFoundError):
        return SvisError(f"{location}: {what} not found")
    if isinstance(e, IsADirectoryError):
        return SvisError(f"{location}: expected a {what}, found a directory")
    if isinstance(e, OSError) and e.strerror and not is_uri(location):
        return SvisError(f"{location}: cannot {action} {what}: {e.strerror}")
    return SvisError(f"{location}: cannot {action} {what}: {_first_line(e)}")


def join(base: Location, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (URIs always use ``/``)."""
    if not is_uri(base):
        return os.path.join(str(base), *parts)
    u = urlsplit(str(base))
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{u.scheme}://{u.netloc}{path}" + (f"?{u.query}" if u.query else "")


def parent(location: Location) -> str:
    """The folder holding ``location`` (``s3://b/runs/x`` -> ``s3://b/runs``)."""
    if not is_uri(location):
        return str(_local(location).parent)
    u = urlsplit(str(location))
    path = u.path.rstrip("/").rsplit("/", 1)[0]
    return f"{u.scheme}://{u.netloc}{path}" + (f"?{u.query}" if u.query else "")


def basename(location: Location) -> str:
    return urlsplit(str(location)).path.rstrip("/").rsplit("/", 1)[-1] if is_uri(location) \
        else _local(location).name


def absolute(location: Location) -> str:
    """A URI as given; a local path made absolute (for processes that run in another folder)."""
    return str(location) if is_uri(location) else str(_local(location).resolve())


# ----------------------------------------------------------------------------- queries
def exists(location: Location) -> bool:
    if not is_uri(location):
        return _local(location).exists()
    import pyarrow
    import pyarrow.fs

    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except (OSError, pyarrow.ArrowException) as e:
        raise _error(location, "reach", e, "location") from None


def is_file(location: Location) -> bool:
    if not is_uri(location):
        return _local(location).is_file()
    import pyarrow.fs

    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type == pyarrow.fs.FileType.File
    except OSError as e:
        raise _error(location, "reach", e, "location") from None


def makedirs(location: Location) -> None:
    """Create a folder and its parents (on object stores: nothing to create but the bucket,
    which must exist)."""
    if not is_uri(location):
        _local(location).mkdir(parents=True, exist_ok=True)
        return
    fs, path = filesystem(location)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise _error(location, "create", e, "folder") from None


# ----------------------------------------------------------------------------- reading
def read_bytes(location: Location, what: str = "file") -> bytes:
    """The whole content of a local file or object."""
    try:
        if not is_uri(location):
            return _local(location).read_bytes()
        fs, path = filesystem(location)
        # A random-access file knows its size: one GET; a stream's read() fetches it in many small ranges.
        with fs.open_input_file(path) as f:
            return f.read()
    except SvisError:
        raise
    except Exception as e:  # OSError, pyarrow.ArrowException
        raise _error(location, "read", e, what) from None


def read_text(location: Location, what: str = "file") -> str:
    data = read_bytes(location, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SvisError(f"{location}: not a UTF-8 text file ({e.reason})") from None


def read_json(location: Location, what: str = "JSON file") -> Any:
    """Load a JSON file or object, turning every failure into a one-line ``SvisError``."""
    text = read_text(location, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SvisError(f"{location}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


# ----------------------------------------------------------------------------- writing
@contextmanager
def atomic_path(path: Location) -> Iterator[Path]:
    """Yield a temporary local path next to ``path``; rename it onto ``path`` only on success."""
    dst = _local(path)
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


@contextmanager
def output_file(location: Location) -> Iterator[Path]:
    """A local temporary file to write into, then placed at ``location`` only on success
    (renamed for a local path, uploaded for a URI): for writers that need a real file name
    (torch.save, zipfile, cv2.VideoWriter)."""
    if not is_uri(location):
        with atomic_path(location) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="svis-ray-") as d:
        tmp = Path(d) / basename(location)
        yield tmp
        upload_file(tmp, location)


@contextmanager
def open_output_stream(location: Location) -> Iterator[BinaryIO]:
    """A binary stream whose content replaces ``location`` when the block ends without error.
    Local: temp file + rename. URI: buffered in memory and uploaded at the end, since a pyarrow
    output stream cannot be aborted (closing it publishes whatever was written)."""
    if not is_uri(location):
        with atomic_path(location) as tmp:
            with open(tmp, "wb") as f:
                yield f
        return
    buf = io.BytesIO()
    yield buf
    write_bytes(location, buf.getvalue())


def write_bytes(location: Location, data: bytes) -> str:
    """Replace ``location`` with ``data`` atomically; returns the location as a string."""
    if not is_uri(location):
        with atomic_path(location) as tmp:
            tmp.write_bytes(data)
        return str(location)
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise _error(location, "write", e) from None
    return str(location)


def write_text(location: Location, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: Location, obj: Any, indent: int | None = None) -> Path | str:
    """Write ``obj`` as JSON atomically (never a half-written file). Returns a ``Path`` for a
    local path, the URI otherwise."""
    write_bytes(location, json.dumps(obj, indent=indent).encode("utf-8"))
    return str(location) if is_uri(location) else Path(location)


def upload_file(local: Location, location: Location) -> str:
    """Copy the local file ``local`` to ``location`` (atomically for a local destination)."""
    if not is_uri(location):
        with atomic_path(location) as tmp:
            shutil.copyfile(local, tmp)
        return str(location)
    fs, path = filesystem(location)
    try:
        with open(local, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 8 * 1024**2)
    except OSError as e:
        raise _error(location, "write", e) from None
    return str(location)


def copy_file(src: Location, dst: Location, src_filesystem=None) -> str:
    """Copy one file between any two locations. ``src_filesystem``: a pyarrow filesystem that
    ``src`` is a plain path on (e.g. a Ray Train ``Checkpoint``'s ``filesystem``/``path``)."""
    if src_filesystem is None and not is_uri(src):
        return upload_file(_local(src), dst)
    fs, path = (src_filesystem, str(src)) if src_filesystem is not None else filesystem(src)
    try:
        if not is_uri(dst):
            with fs.open_input_stream(path) as f, open_output_stream(dst) as out:
                shutil.copyfileobj(f, out, 8 * 1024**2)
        else:
            dfs, dpath = filesystem(dst)
            with fs.open_input_stream(path) as f, dfs.open_output_stream(dpath) as out:
                shutil.copyfileobj(f, out, 8 * 1024**2)
    except SvisError:
        raise
    except OSError as e:
        raise _error(src, "copy", e) from None
    return str(dst)


def copy_tree(src: Location, dst: Location) -> None:
    """Copy a folder between local paths and URIs (``pyarrow.fs.copy_files``)."""
    import pyarrow
    import pyarrow.fs

    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    if not is_uri(dst):
        os.makedirs(dpath, exist_ok=True)
    try:
        pyarrow.fs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)
    except (OSError, pyarrow.ArrowException) as e:
        raise _error(src, "copy", e, "folder") from None


class Appender:
    """Appends text to a log file (``metrics.csv``). A local file is appended to in place; an
    object store cannot append, so the content (read once, if the object exists) is kept in
    memory and the whole object is rewritten at each append -- fine for logs of a few MB."""

    def __init__(self, location: Location) -> None:
        self.location = str(location)
        self._text: str | None = None

    def existing(self) -> str:
        """The file's content so far ('' if it does not exist)."""
        if not is_uri(self.location):
            p = _local(self.location)
            return p.read_text() if p.exists() else ""
        if self._text is None:
            self._text = read_text(self.location) if exists(self.location) else ""
        return self._text

    def append(self, text: str) -> None:
        if not is_uri(self.location):
            p = _local(self.location)
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a", newline="") as f:
                f.write(text)
            return
        self._text = self.existing() + text
        write_text(self.location, self._text)


class MirroredDir:
    """A local temporary folder whose files are uploaded to ``location`` at each ``sync()``: for
    writers that only write local files (TensorBoard's event writer). For a local ``location`` it
    is that folder itself and ``sync()`` does nothing."""

    def __init__(self, location: Location) -> None:
        self.location = str(location)
        self.remote = is_uri(location)
        self.local = tempfile.mkdtemp(prefix="svis-ray-mirror-") if self.remote else str(location)

    def sync(self) -> None:
        if not self.remote:
            return
        for root, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(root, name)
                upload_file(path, join(self.location, os.path.relpath(path, self.local).replace(os.sep, "/")))

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class Spool:
    """Byte records appended to a local scratch file and read back by key: what a long job
    produces (``predict``'s results, video by video) stays on disk instead of in memory; only
    each record's offset and size are kept. ``close`` removes the file. Local paths only (a URI
    output is staged in a local folder first)."""

    def __init__(self, location: Location) -> None:
        if is_uri(location):
            raise SvisError(f"{location}: a spool file must be local")
        self.path = _local(location)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w+b")
        self._spans: dict[Any, tuple[int, int]] = {}
        self._end = 0

    def append(self, key: Any, data: bytes) -> None:
        self._file.seek(self._end)
        self._file.write(data)
        self._file.flush()  # on disk now (one write per record), not in the process's buffer
        self._spans[key] = (self._end, len(data))
        self._end += len(data)

    def read(self, key: Any) -> bytes:
        offset, size = self._spans[key]
        self._file.seek(offset)
        return self._file.read(size)

    def keys(self) -> list[Any]:
        return list(self._spans)

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._end

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
