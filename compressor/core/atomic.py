"""Atomic directory writes and sha256 manifests.

An export is written into a temporary sibling directory and renamed into
place only when complete, so an interrupted or failed write (full disk,
Ctrl-C) never leaves a partial model where a loader would find it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from compressor.core.paths import sha256_file

__all__ = ["atomic_directory", "check_output_dir", "atomic_file", "check_output_file", "write_manifest",
           "verify_manifest", "MANIFEST"]

log = logging.getLogger(__name__)

MANIFEST = "compressor_manifest.json"


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; call before any long work."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output directory {path} already exists: choose another path or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a directory")
    return path


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output file unless ``overwrite`` (and a directory always); call before any long work."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"output path {path} is a directory: name a file, e.g. {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output file {path} already exists: choose another path or pass --overwrite")
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` (fsynced, renamed) when the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = check_output_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the disk while writing {path}; nothing was replaced") from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block succeeds.

    On any exception the temporary directory is removed and ``path`` is left
    as it was. A full disk is reported as an OSError that says so.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir_tree(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while writing {path}; nothing was written there. "
                "Free disk space or choose an output on another disk",
            ) from err
        raise


def _fsync_dir_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def write_manifest(root: Path, info: dict) -> Path:
    """Write ``compressor_manifest.json``: sha256 of every file plus ``info``."""
    files = {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    out = root / MANIFEST
    out.write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=False), encoding="utf-8")
    return out


def verify_manifest(root: Path) -> dict:
    """Check every file against the manifest; return the manifest.

    Raises:
        ValueError: a file is missing, truncated or altered.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {MANIFEST}: it was not written by compressor, or is incomplete")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for rel, meta in manifest.get("files", {}).items():
        file = Path(root) / rel
        if not file.is_file():
            raise ValueError(f"{file} is listed in the manifest but missing: the export is incomplete; re-export it")
        if file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
            raise ValueError(f"{file} does not match its sha256 in {MANIFEST}: the file is corrupt or truncated; re-export it")
    return manifest
