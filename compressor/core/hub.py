"""Model references: a local directory, or a Hugging Face Hub repo id resolved through huggingface_hub's cache.

Every command and API function that takes a model takes either form, as the
peers do (``compressor compress Qwen/Qwen3-0.6B ...``). A Hub id downloads what
loading needs (configs, tokenizer files, ``*.safetensors``; the repo's Python
files only with ``trust_remote_code``) into the standard Hub cache
(``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and resolves to the
snapshot directory there; offline (``HF_HUB_OFFLINE=1``, or no network) a cached
snapshot is used as is. Pickled ``*.bin`` weights are never downloaded or loaded:
unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

__all__ = ["resolve_model", "looks_like_repo_id", "check_remote_code", "BIN_ONLY_HINT"]

log = logging.getLogger(__name__)

# what loading a model, its tokenizer and its generation settings reads; no pickles
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.tokenizer"]
_CODE_PATTERNS = ["*.py"]
# namespace/name (or a bare name), as the Hub validates repo ids
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")

BIN_ONLY_HINT = (
    "compressor loads safetensors only (unpickling a *.bin file can run arbitrary code). Convert it once, "
    "where you trust the file: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('IN', use_safetensors=False).save_pretrained('OUT')\" (save_pretrained writes "
    "safetensors), or use a revision of the repo that has *.safetensors (many have a 'convert to safetensors' "
    "pull request: --revision refs/pr/N)"
)


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id (``org/name`` or ``name``) rather than a path."""
    return bool(_REPO_ID.match(name)) and not name.startswith(".") and ".." not in name and not name.endswith(".")


def resolve_model(name_or_path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The local directory of a model: ``name_or_path`` itself, or the Hub-cache snapshot of a repo id.

    Args:
        name_or_path: a directory, or a Hub repo id such as ``"Qwen/Qwen3-0.6B"`` (a path that
            exists always wins over a repo id of the same spelling).
        revision: branch, tag or commit of a repo id (default: ``main``); not for directories.
        trust_remote_code: also fetch the repo's ``*.py`` files (custom modelling code).

    Returns:
        The directory to load from.

    Raises:
        FileNotFoundError: neither a directory nor a repo id; or a repo id that is not in the
            cache while the Hub cannot be reached (names the id, the cache and how to pre-download);
            or a repo without ``*.safetensors`` weights.
        ValueError: ``revision`` given with a directory.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids, but {path} is a local directory: "
                             "drop --revision, or check out that revision into the directory yourself")
        return path
    name = str(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"{name} is a file, not a model directory (nor a Hub repo id such as 'Qwen/Qwen3-0.6B')")
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"{name} does not exist (and is not a Hub repo id such as 'Qwen/Qwen3-0.6B')")
    return _snapshot(name, revision, trust_remote_code)


def _snapshot(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = Path(constants.HF_HUB_CACHE)
    offline = bool(constants.HF_HUB_OFFLINE)
    patterns = _WEIGHT_PATTERNS + (_CODE_PATTERNS if trust_remote_code else [])
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:  # the Hub answered: no
        raise FileNotFoundError(f"Hub repo {repo_id!r}{at} cannot be read: {err}") from None
    except LocalEntryNotFoundError:  # offline, or no network, and nothing cached
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{repo_id!r}{at} is not a local directory, and it is not in the Hugging Face cache {cache} while {why}. "
            f"Download it first where the Hub is reachable: `hf download {repo_id}"
            f"{f' --revision {revision}' if revision else ''} --include '*.json' '*.safetensors' '*.model' '*.txt' "
            f"'*.jinja'` (then copy {cache} here, or point HF_HUB_CACHE at the copy), or pass the model's local "
            "directory instead"
        ) from None
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"Hub repo {repo_id!r}{at} has no *.safetensors weights ({folder}): {BIN_ONLY_HINT}")
    log.info("%s%s resolved to %s", repo_id, at, folder)
    return folder


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse a checkpoint whose architecture exists only as the repo's own Python code, unless trusted.

    Raises:
        ValueError: ``config.json`` maps to custom code (``auto_map``) for a ``model_type``
            transformers does not know, and ``trust_remote_code`` is False.
    """
    if trust_remote_code:
        return
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # the loader reports a missing or corrupt config itself
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"{path} needs the repo's own modelling code (config.json auto_map, model_type "
                         f"{config.get('model_type')!r} unknown to transformers); it runs only if you trust it: "
                         "pass --trust-remote-code (trust_remote_code=True)")
