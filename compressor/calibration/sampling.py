"""Token windows for calibration (random, seeded) and evaluation (consecutive).

Protocol: the source text is tokenized once with the model's tokenizer, with no
special tokens added (SmolLM2's tokenizer adds none anyway). Evaluation cuts the
first ``max_tokens`` tokens into consecutive non-overlapping windows; calibration
draws ``n`` windows at uniform random starts from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from compressor.calibration.sources import load_text
from compressor.core.memory import trim_heap

logger = logging.getLogger(__name__)


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenize a whole text once, without special tokens.

    Args:
        text: the text (any length; the model's max length does not apply here,
            and the tokenizer's "sequence too long" warning is silenced).
        tokenizer: a Hugging Face tokenizer (callable, returning ``input_ids``).

    Returns:
        Token ids, ``torch.int64`` of shape ``[T]``.

    Raises:
        ValueError: ``text`` is not a string or yields no tokens.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    # verbose=False only skips the "longer than model_max_length" warning.
    encoded = tokenizer(
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)  # (T,)
    del encoded
    trim_heap()  # a fast tokenizer's encoding of a whole corpus leaves ~1 GB of freed heap resident
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(
            f"tokenizing {len(text)} characters gave token ids of shape {tuple(ids.shape)}"
        )
    return ids


def eval_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows over the first ``max_tokens`` tokens.

    Args:
        ids: token ids, integer tensor of shape ``[T]``.
        seq_len: window length (> 1).
        max_tokens: use only the first this-many tokens; ``None`` uses all.

    Returns:
        ``torch.int64`` tensor ``[N, seq_len]`` with ``N = min(T, max_tokens) // seq_len``;
        a short tail is dropped. A copy, never a view of ``ids``.

    Raises:
        ValueError: bad arguments, or fewer tokens than one window.
    """
    _check_ids(ids)
    _check_seq_len(seq_len)
    if max_tokens is not None and not _positive_int(max_tokens):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    used = ids[:max_tokens] if max_tokens is not None else ids
    n = used.numel() // seq_len
    if n < 1:
        raise ValueError(
            f"{used.numel()} tokens (of {ids.numel()}, max_tokens={max_tokens}) make no window of "
            f"seq_len={seq_len}; use a longer text, a larger max_tokens or a smaller seq_len"
        )
    return used[: n * seq_len].reshape(n, seq_len).to(torch.long, copy=True)  # (N, seq_len)


def sample_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows at uniform random starts in ``[0, T - seq_len]``, seeded.

    Starts are drawn with ``torch.randint`` from ``torch.Generator().manual_seed(seed)``,
    so the same ids, n, seq_len and seed always give the same windows. Windows
    may overlap.

    Args:
        ids: token ids, integer tensor of shape ``[T]``.
        n: number of windows (> 0).
        seq_len: window length (> 1).
        seed: generator seed.

    Returns:
        ``torch.int64`` tensor ``[n, seq_len]``.

    Raises:
        ValueError: bad arguments, or ``T < seq_len``.
    """
    _check_ids(ids)
    _check_n(n)
    _check_seq_len(seq_len)
    total = ids.numel()
    if total < seq_len:
        raise ValueError(
            f"the text has {total} tokens, fewer than seq_len={seq_len}; "
            f"use a longer source or a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, total - seq_len + 1, (n,), generator=generator)  # (n,)
    index = starts[:, None] + torch.arange(seq_len)  # (n, seq_len)
    return ids.to(torch.long)[index]  # (n, seq_len)


def ids_sha256(ids: torch.Tensor) -> str:
    """Hex sha256 of token ids as little-endian int64 bytes (shape not included)."""
    array = ids.detach().to("cpu", torch.int64).contiguous().numpy()
    return hashlib.sha256(array.astype("<i8", copy=False).tobytes()).hexdigest()


@dataclass(frozen=True, eq=False, kw_only=True)
class CalibrationSet:
    """A recorded calibration set: the windows, where they came from, and their hash.

    Attributes:
        input_ids: ``torch.int64`` tensor ``[n, seq_len]``.
        source: the source spec it was drawn from (see ``load_text``).
        seed: the sampling seed.
        sha256: hex sha256 of ``input_ids`` (little-endian int64 bytes, row-major),
            computed on construction, to record beside exports.
    """

    input_ids: torch.Tensor = field(repr=False)
    source: str
    seed: int
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be an int64 tensor [n, seq_len], got {_describe(ids)}"
            )
        object.__setattr__(self, "sha256", ids_sha256(ids))

    @property
    def n(self) -> int:
        """Number of windows."""
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per window."""
        return self.input_ids.shape[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (no token ids) to save beside an export."""
        return {
            "source": self.source,
            "seed": self.seed,
            "n": self.n,
            "seq_len": self.seq_len,
            "sha256": self.sha256,
        }


def calibration_set(
    source: str, tokenizer: Any, n: int = 128, seq_len: int = 512, seed: int = 0
) -> CalibrationSet:
    """Load a source, tokenize it once and draw ``n`` seeded windows.

    Args:
        source: a source spec (``"sotu:1790-1999"``, a .txt/.jsonl path, ``hf:...``).
        tokenizer: the model's Hugging Face tokenizer.
        n: number of windows (> 0).
        seq_len: tokens per window (> 1).
        seed: sampling seed.

    Returns:
        A :class:`CalibrationSet` with ``input_ids`` of shape ``[n, seq_len]``.
    """
    _check_n(n)
    _check_seq_len(seq_len)
    ids = tokenize(load_text(source), tokenizer)
    windows = sample_windows(ids, n, seq_len, seed)
    result = CalibrationSet(input_ids=windows, source=source, seed=seed)
    logger.info(
        "calibration set %s: %d x %d tokens drawn from %d, sha256 %s",
        source, n, seq_len, ids.numel(), result.sha256[:12],
    )
    return result


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_ids(ids: torch.Tensor) -> None:
    integer = isinstance(ids, torch.Tensor) and not (
        ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool
    )
    if not integer or ids.ndim != 1:
        raise ValueError(
            f"ids must be a 1-D integer tensor [T] (see tokenize), got {_describe(ids)}"
        )


def _check_n(n: int) -> None:
    if not _positive_int(n):
        raise ValueError(f"n must be a positive int, got {n!r}")


def _check_seq_len(seq_len: int) -> None:
    if not _positive_int(seq_len) or seq_len < 2:
        raise ValueError(
            f"seq_len must be an int > 1 (a window needs an input and a target), got {seq_len!r}"
        )
