"""lm-evaluation-harness tasks (hellaswag, arc_easy, ...) on an already loaded model.

Optional: needs ``pip install 'compressor[lmeval]'`` (``lm-eval>=0.4``), which
downloads each task's data set from the Hugging Face hub on first use. The
loaded model (a checkpoint or a compressor export, placed as the suite placed
it) is wrapped in lm-eval's ``HFLM`` and run through ``lm_eval.simple_evaluate``;
the metrics come back as flat row fields ``<task>/<metric>``.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Iterable

from torch import nn

__all__ = ["INSTALL_HINT", "lm_eval_fields", "lm_eval_missing", "require_lm_eval", "run_lm_eval", "split_tasks"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'compressor[lmeval]'"


def lm_eval_missing() -> str | None:
    """None when ``lm_eval`` imports, else the message that says how to install it."""
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        return f"lm-evaluation-harness tasks need the lm_eval package, which is not installed: {INSTALL_HINT}"
    return None


def require_lm_eval() -> None:
    """Raise ``ImportError`` naming the extra to install when ``lm_eval`` is absent."""
    missing = lm_eval_missing()
    if missing:
        raise ImportError(missing)


def split_tasks(spec: str | None) -> tuple[str | None, tuple[str, ...]]:
    """Split a ``--tasks`` value into a local task file and lm-eval task names.

    ``spec`` is comma-separated. An entry that is an existing file, ends in ``.jsonl``
    or names a shipped task (``phrases``) is the local multiple-choice file; every other
    entry is an lm-evaluation-harness task name (``hellaswag``, ``arc_easy``...).

    Returns:
        ``(local task file or None, lm-eval task names in the given order)``.

    Raises:
        ValueError: more than one local task file, or an empty entry.
    """
    from compressor.eval.choice import SHIPPED_TASKS

    if not spec:
        return None, ()
    if Path(spec).is_file():
        return spec, ()
    entries = [e.strip() for e in spec.split(",")]
    if not all(entries):
        raise ValueError(f"--tasks {spec!r} has an empty entry: separate task names with single commas")
    local = [e for e in entries if e.endswith(".jsonl") or e in SHIPPED_TASKS or Path(e).is_file()]
    if len(local) > 1:
        raise ValueError(f"--tasks names {len(local)} local task files ({', '.join(local)}): "
                         "merge them into one .jsonl")
    return (local[0] if local else None), tuple(e for e in entries if e not in local)


def lm_eval_fields(results: dict) -> dict[str, float]:
    """Flatten an ``lm_eval.simple_evaluate`` result into row fields.

    ``results["results"][task]["acc,none"] = 0.31`` becomes ``{"task/acc": 0.31}``; a
    filter other than ``none`` is kept in brackets (``"gsm8k/exact_match[strict-match]"``);
    ``alias`` and non-numeric values (``"N/A"`` stderr) are dropped; the evaluated
    sample count ``results["n-samples"][task]["effective"]`` becomes ``"task/samples"``.
    """
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[f"{task}/{name}" + ("" if filt in ("", "none") else f"[{filt}]")] = float(value)
    for task, counts in (results.get("n-samples") or {}).items():
        if isinstance(counts, dict) and "effective" in counts:
            out[f"{task}/samples"] = counts["effective"]
    return out


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Iterable[str],
    *,
    batch_size: int = 4,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on a loaded causal LM.

    Args:
        model: a loaded Hugging Face causal LM (possibly dispatched by accelerate).
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. ``("hellaswag", "arc_easy")``.
        batch_size: requests per forward pass.
        limit: evaluate only the first ``limit`` documents per task (a fraction when < 1).
        num_fewshot: few-shot examples per prompt (default: each task's own).

    Returns:
        row fields from :func:`lm_eval_fields`.

    Raises:
        ImportError: ``lm_eval`` is not installed (the message names the extra).
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    log.info("lm-evaluation-harness: %s", ", ".join(tasks))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=False)
    if results is None:  # lm-eval returns None on processes other than its rank 0
        return {}
    return lm_eval_fields(results)
