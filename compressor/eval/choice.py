"""Zero-shot multiple-choice tasks from local JSONL, scored by log-likelihood.

A task file has one JSON object per line (blank lines are skipped)::

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0}

``context`` (non-empty string), ``choices`` (a list of at least two non-empty
strings) and ``gold`` (the index of the right choice) are required; ``id``
(any JSON value) is optional and ignored. Any other field is an error, so a
misspelt key fails loudly instead of being skipped.

Scoring, as lm-evaluation-harness does it: the log-likelihood of a choice is the
sum of the log-probabilities of its tokens given the context. ``acc`` picks the
choice with the highest sum; ``acc_norm`` divides each sum by the length of the
choice in UTF-8 bytes first (lm-evaluation-harness's ``acc_norm``), so long
choices are not penalised for having more tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.progress import progress
from compressor.eval.distributed import gather_in_order, is_main_process, split_for_process
from compressor.export.placement import input_device

__all__ = ["ChoiceItem", "ChoiceResult", "SHIPPED_TASKS", "load_choice_tasks", "choice_logliks", "score_choice_tasks",
           "resolve_task_file", "split_tokens"]

log = logging.getLogger(__name__)

_DATA = Path(__file__).resolve().parent / "data"
SHIPPED_TASKS = {"phrases": _DATA / "phrases.jsonl"}
"""Task files that ship with the package, by name (``--tasks phrases``)."""

_FIELDS = {"context", "choices", "gold"}
_OPTIONAL = {"id"}


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: ``context`` followed by one of ``choices``; ``gold`` is the right index."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ChoiceResult:
    """Accuracy over a task file.

    Attributes:
        acc: fraction of items whose highest summed log-likelihood choice is gold.
        acc_norm: the same with each sum divided by the choice's UTF-8 byte length.
        items: number of items.
        logliks: per item, the float64 (C,) summed log-likelihood of each choice.
    """

    acc: float
    acc_norm: float
    items: int
    logliks: tuple[torch.Tensor, ...]


def resolve_task_file(name: str | Path) -> Path:
    """A task file path, or the path of a shipped task named in :data:`SHIPPED_TASKS`."""
    path = Path(name)
    if path.is_file():
        return path
    if str(name) in SHIPPED_TASKS:
        return SHIPPED_TASKS[str(name)]
    raise FileNotFoundError(f"task file {name} does not exist: pass a .jsonl path or one of {sorted(SHIPPED_TASKS)}")


def load_choice_tasks(path: str | Path) -> list[ChoiceItem]:
    """Read and validate a JSONL multiple-choice task file (format in the module docstring).

    Raises:
        FileNotFoundError: no such file (and no shipped task of that name).
        ValueError: bad JSON, a missing or unknown field, a wrong type, an out-of-range
            ``gold`` or an empty file; the message names the line.
    """
    path = resolve_task_file(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg}): write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where} is a {type(obj).__name__}, not a JSON object with context, choices, gold")
        unknown = sorted(set(obj) - _FIELDS - _OPTIONAL)
        if unknown:
            raise ValueError(f"{where} has unknown field {unknown[0]!r}: the fields are context, choices, gold (and "
                             "optional id)")
        missing = sorted(_FIELDS - set(obj))
        if missing:
            raise ValueError(f"{where} is missing field {missing[0]!r}: every line needs context, choices and gold")
        items.append(_item(obj, where))
    if not items:
        raise ValueError(f"{path} has no task items: add lines like "
                         '{"context": "...", "choices": [" a", " b"], "gold": 0}')
    return items


def _item(obj: dict, where: str) -> ChoiceItem:
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"{where}: field 'context' must be a non-empty string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: field 'choices' must be a list of at least two non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: field 'gold' must be an integer index into choices (0..{len(choices) - 1}), "
                         f"got {gold!r}")
    return ChoiceItem(context=context, choices=tuple(choices), gold=gold)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"])


def split_tokens(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the choice as they are tokenized together.

    Trailing whitespace of the context moves to the choice; the choice's tokens are
    those of ``context + choice`` after the context's own tokens (lm-evaluation-harness).

    Returns:
        ``(context_ids, choice_ids)``, lists of ints; ``choice_ids`` is never empty.
    """
    stripped = context.rstrip()
    choice = context[len(stripped):] + choice
    ctx_ids = _encode(tokenizer, stripped)
    whole = _encode(tokenizer, stripped + choice)
    if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
        return ctx_ids, whole[len(ctx_ids):]
    return ctx_ids, _encode(tokenizer, choice)  # the boundary merged: tokenize the choice on its own


@torch.no_grad()
def choice_logliks(model: nn.Module, tokenizer: Any, item: ChoiceItem) -> torch.Tensor:
    """Summed log-likelihood of each choice's tokens given the context.

    All choices of the item run in one right-padded batch (padding follows the
    scored tokens, so causal attention never sees it). Contexts longer than the
    model's ``max_position_embeddings`` are cut from the left.

    Args:
        model: causal LM returning ``.logits`` (B, L, V).
        tokenizer: Hugging Face tokenizer of the model.
        item: the question.

    Returns:
        float64 (C,) log-likelihoods in nats, one per choice.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqs, spans = [], []
    for choice in item.choices:
        ctx_ids, ch_ids = split_tokens(tokenizer, item.context, choice)
        seq = ctx_ids + ch_ids
        if limit and len(seq) > limit:
            if len(ch_ids) >= limit:
                raise ValueError(f"choice {choice[:40]!r} is {len(ch_ids)} tokens, more than the model's "
                                 f"max_position_embeddings={limit}: shorten it")
            seq = seq[len(seq) - limit:]
        seqs.append(seq)
        spans.append(len(ch_ids))
    width = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)  # (C, L), right-padded with token 0
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    device = input_device(model)
    logp = F.log_softmax(model(input_ids=x.to(device), use_cache=False).logits.float(), dim=-1)  # (C, L, V)
    out = torch.empty(len(seqs), dtype=torch.float64)
    for i, (s, k) in enumerate(zip(seqs, spans)):
        pos = torch.arange(len(s) - k, len(s), device=logp.device)  # positions of the choice tokens
        target = x[i, len(s) - k : len(s)].to(logp.device)
        out[i] = logp[i, pos - 1, target].double().sum()
    return out


def score_choice_tasks(model: nn.Module, tokenizer: Any, items: list[ChoiceItem], *, quiet: bool = False) -> ChoiceResult:
    """Accuracy (raw and byte-length-normalized) of ``model`` on multiple-choice ``items``.

    Ties go to the lowest index. Under ``accelerate launch`` each process scores a
    contiguous share of the items and the log-likelihoods are gathered in item order,
    so every process returns the same result.
    """
    was = model.training
    model.eval()
    share = split_for_process(items)
    bar = progress(share, "tasks", quiet=quiet or not is_main_process())
    mine = [choice_logliks(model, tokenizer, item) for item in bar]  # float64 (C,) per item
    model.train(was)
    all_ll = gather_in_order(mine)  # float64 (C,) per item, in item order
    correct, correct_norm = 0, 0
    for item, ll in zip(items, all_ll):
        lengths = torch.tensor([len(c.encode("utf-8")) for c in item.choices], dtype=torch.float64)
        correct += int(int(ll.argmax()) == item.gold)
        correct_norm += int(int((ll / lengths).argmax()) == item.gold)
    n = len(items)
    return ChoiceResult(acc=correct / n, acc_norm=correct_norm / n, items=n, logliks=tuple(all_ll))
