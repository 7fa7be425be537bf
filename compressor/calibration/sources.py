"""Turn a calibration/evaluation source spec into one string of text.

Accepted forms (see :data:`SOURCE_FORMS`)::

    sotu                    all State of the Union speeches, 1790-2021
    sotu:1790-1999          speeches in an inclusive year range
    sotu:2015               speeches of one year
    notes.txt               any non-.jsonl file, read as UTF-8
    data.jsonl              one JSON object per line, field "text"
    data.jsonl#body         ... field "body"
    hf:NAME[:CONFIG]:SPLIT[#field]   a Hugging Face dataset (needs `datasets`, online)

Multi-record sources are joined with ``"\\n\\n"``, as the speeches are.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from compressor.calibration.sotu import SOTU_FIRST_YEAR, SOTU_LAST_YEAR, sotu_text

logger = logging.getLogger(__name__)

DEFAULT_FIELD = "text"
SOURCE_FORMS = (
    "sotu | sotu:FIRST-LAST | sotu:YEAR | PATH.txt (any non-.jsonl file) | "
    "PATH.jsonl[#field] | hf:NAME[:CONFIG]:SPLIT[#field]"
)

_SOTU_RANGE = re.compile(r"^(\d{4})(?:-(\d{4}))?$")


def load_text(source: str) -> str:
    """Load the text named by a source spec.

    Args:
        source: one of the forms in :data:`SOURCE_FORMS`.

    Returns:
        The text, non-empty.

    Raises:
        FileNotFoundError: a path that does not exist (message lists the accepted forms).
        ValueError: a malformed spec, a bad JSONL line, or empty text.
        ImportError: ``hf:`` without the ``datasets`` package.
        OSError: ``hf:`` when the dataset cannot be fetched (e.g. offline).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a non-empty string, one of: {SOURCE_FORMS}")
    if source == "sotu" or source.startswith("sotu:"):
        text = _load_sotu(source)
    elif source.startswith("hf:"):
        text = _load_hf(source)
    else:
        text = _load_path(source)
    if not text.strip():
        raise ValueError(f"source {source!r} gave empty text; calibration needs some tokens")
    return text


def parse_sotu_spec(source: str) -> tuple[int, int]:
    """``"sotu"``, ``"sotu:1790-1999"`` or ``"sotu:2015"`` -> (first_year, last_year)."""
    if source == "sotu":
        return SOTU_FIRST_YEAR, SOTU_LAST_YEAR
    match = _SOTU_RANGE.match(source.removeprefix("sotu:"))
    if match is None:
        raise ValueError(
            f"cannot parse {source!r}: write sotu, sotu:FIRST-LAST (e.g. sotu:1790-1999) "
            f"or sotu:YEAR (e.g. sotu:2015)"
        )
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    return first, last


def _load_sotu(source: str) -> str:
    first, last = parse_sotu_spec(source)
    return sotu_text(first, last)


def _load_path(source: str) -> str:
    path, field = _split_field(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration source {str(path)!r} is not a file and not a built-in source. "
            f"Accepted forms: {SOURCE_FORMS}"
        )
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, field or DEFAULT_FIELD)
    if field is not None:
        raise ValueError(f"'#{field}' selects a JSONL field, but {path} is not a .jsonl file")
    return path.read_text(encoding="utf-8")


def _split_field(source: str) -> tuple[Path, str | None]:
    """``data.jsonl#body`` -> (Path("data.jsonl"), "body"); a path that exists wins."""
    whole = Path(source).expanduser()
    if whole.exists() or "#" not in source:
        return whole, None
    base, _, field = source.rpartition("#")
    if not field:
        raise ValueError(f"empty field name after '#' in {source!r}")
    return Path(base).expanduser(), field


def _read_jsonl(path: Path, field: str) -> str:
    """Join ``record[field]`` over the JSON lines of ``path`` (blank lines skipped)."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}"
                )
            if field not in record:
                raise ValueError(
                    f"{path}:{line_no}: no field {field!r} (fields: {sorted(record)}); "
                    f"pick one with {path.name}#FIELD"
                )
            value = record[field]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{line_no}: field {field!r} is {type(value).__name__}, not a string"
                )
            texts.append(value)
    logger.debug("%s: %d records from field %r", path, len(texts), field)
    return "\n\n".join(texts)


def parse_hf_spec(source: str) -> tuple[str, str | None, str, str]:
    """``hf:NAME[:CONFIG]:SPLIT[#field]`` -> (name, config, split, field)."""
    body, hash_sign, field = source.removeprefix("hf:").partition("#")
    parts = body.split(":")
    if len(parts) not in (2, 3) or not all(parts) or (hash_sign and not field):
        raise ValueError(
            f"cannot parse {source!r}: write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, "
            f"optionally with #field (e.g. hf:wikitext:wikitext-2-raw-v1:test#text)"
        )
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    return name, config, split, field or DEFAULT_FIELD


def _load_hf(source: str) -> str:
    name, config, split, field = parse_hf_spec(source)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"source {source!r} needs the Hugging Face `datasets` package: "
            f"pip install datasets (or save the text to a .txt/.jsonl file and pass its path)"
        ) from err
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except OSError as err:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise OSError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): "
            f"{err}. Loading needs network access or a local datasets cache; offline, save the "
            f"text to a .txt/.jsonl file and pass its path instead"
        ) from err
    columns = list(getattr(dataset, "column_names", []) or [])
    if field not in columns:
        raise ValueError(
            f"dataset {name!r} split {split!r} has no column {field!r} (columns: {columns}); "
            f"pick one with {source.partition('#')[0]}#COLUMN"
        )
    return "\n\n".join(dataset[field])
