"""Where downloaded and derived artifacts live, and how they get there safely.

Layout under :func:`cache_dir` (``$COMPRESSOR_CACHE`` or ``~/.cache/compressor``)::

    datasets/sotu-0.2.3/*.txt                    State of the Union speeches
    models/smollm2-135m-instruct-fp32/           SmolLM2-135M-Instruct, fp32 safetensors
    locks/*.lock                                 one flock file per artifact
    tmp/                                         staging dirs, renamed into place

Every artifact is built in a staging directory on the same filesystem and moved
into place with one ``os.replace``, so an interrupted build never leaves a
half-written directory where a finished one is expected. Builds take a
``fcntl.flock`` lock so two processes (say ``pytest`` and ``make demo``) never
build the same artifact at once. POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "COMPRESSOR_CACHE"


def cache_dir() -> Path:
    """Root of the artifact cache, created on demand.

    Returns:
        ``Path($COMPRESSOR_CACHE)`` when that variable is set and non-empty,
        else ``~/.cache/compressor``. The directory exists on return.
    """
    root = os.environ.get(CACHE_ENV, "").strip()
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "compressor"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``cache_dir()/locks/<name>.lock``.

    Blocks until any other process holding the same lock lets go. The lock is
    released when the block exits, even on error, and by the OS if the process
    dies.

    Args:
        name: artifact name, e.g. ``"smollm2-135m-instruct-fp32"``.

    Yields:
        The lock file's path.
    """
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock_path = lock_dir / f"{name}.lock"
    with open(lock_path, "a+b") as handle:
        logger.debug("waiting for lock %s", lock_path)
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield lock_path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(prefix: str) -> Iterator[Path]:
    """A scratch directory under ``cache_dir()/tmp``, removed on exit.

    It sits on the cache's filesystem, so files built there can be moved into
    place with ``os.replace``.
    """
    tmp_root = cache_dir() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=tmp_root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory in staging, then rename it to ``final`` in one step.

    The caller fills the yielded directory. If the block raises, the staging
    directory is deleted and ``final`` is left untouched. Call this while
    holding the artifact's :func:`file_lock`.

    Args:
        final: where the finished directory should appear. Must not exist yet
            (or be empty); its parent is created.

    Yields:
        The staging directory to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(final.name) as stage:
        build = stage / final.name
        build.mkdir()
        yield build
        os.replace(build, final)
        logger.info("wrote %s", final)


def cached_artifact(final: Path, name: str, complete: Callable[[Path], bool],
                    build: Callable[[Path, Path], None]) -> Path:
    """Return ``final``, building it once under a lock if it is not complete.

    Args:
        final: the artifact directory.
        name: lock and staging name.
        complete: whether a directory holds a finished artifact.
        build: ``build(download_dir, out_dir)`` fills ``out_dir``; ``download_dir``
            is scratch space removed afterwards.
    """
    if complete(final):
        return final
    with file_lock(name):
        if complete(final):  # another process finished it while we waited
            return final
        if final.exists():
            logger.warning("removing incomplete directory %s", final)
            shutil.rmtree(final)
        with staging_dir(f"{name}-download") as download, atomic_dir(final) as out:
            build(download, out)
    return final


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_bytes`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise ``ValueError`` unless ``path`` hashes to ``expected``.

    Args:
        path: file to check.
        expected: lowercase hex sha256.
        what: a human name for the file, used in the error message.
    """
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"{what} at {path} has sha256 {actual}, expected {expected}. The file is "
            f"corrupt or a different version; delete it and fetch it again."
        )
