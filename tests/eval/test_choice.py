"""Multiple-choice scoring against brute-force log-likelihoods; task file validation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tests.helpers import tiny_llama, tiny_tokenizer
from torch import nn

from compressor.eval.choice import (
    SHIPPED_TASKS,
    ChoiceItem,
    choice_logliks,
    load_choice_tasks,
    score_choice_tasks,
    split_tokens,
)


class NextTokenModel(nn.Module):
    """Rigged LM: after token t it puts logit 10 on token t+1 (mod V), 0 elsewhere."""

    def __init__(self, vocab: int = 96):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)  # (B, L, V)
        logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], 10.0)
        return SimpleNamespace(logits=logits)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_loglik_equals_brute_force():
    model, tok = tiny_llama(), tiny_tokenizer()
    item = ChoiceItem(context="w1 w2 ", choices=("w3", "w4 w5 w6"), gold=0)
    ll = choice_logliks(model, tok, item)
    assert ll.dtype == torch.float64 and ll.shape == (2,)
    for i, cont in enumerate([[3], [4, 5, 6]]):
        seq = torch.tensor([[1, 2] + cont])
        with torch.no_grad():
            logp = model(seq).logits[0].double().log_softmax(-1)  # (L, V)
        expected = sum(logp[1 + j, t].item() for j, t in enumerate(cont))
        assert ll[i].item() == pytest.approx(expected, rel=1e-5)


def test_split_tokens_moves_trailing_space_to_the_choice():
    tok = tiny_tokenizer()
    assert split_tokens(tok, "w1 w2 ", "w3") == ([1, 2], [3])
    assert split_tokens(tok, "w1 w2", " w3 w4") == ([1, 2], [3, 4])


def test_rigged_model_accuracy_raw_and_normalized():
    model, tok = NextTokenModel(), tiny_tokenizer()
    items = [
        ChoiceItem(context="w1 w2", choices=(" w9", " w3"), gold=1),
        ChoiceItem(context="w5", choices=(" w6 w7 w8", " w2", " w40"), gold=0),
        # raw: " w9" (-10.0) narrowly beats " w9 w10 w11 w12 w13" (-10.0 - 4 * 0.004);
        # per byte the long one wins (-10.02 / 19 vs -10.0 / 3), and it is gold
        ChoiceItem(context="w1", choices=(" w9", " w9 w10 w11 w12 w13"), gold=1),
    ]
    res = score_choice_tasks(model, tok, items, quiet=True)
    assert res.items == 3 and res.acc == pytest.approx(2 / 3) and res.acc_norm == 1.0
    assert [ll.shape[0] for ll in res.logliks] == [2, 3, 2]


def test_long_context_is_cut_from_the_left():
    model, tok = NextTokenModel(), tiny_tokenizer()
    context = " ".join(f"w{i % 90}" for i in range(100))  # 100 tokens, limit 64
    ll = choice_logliks(model, tok, ChoiceItem(context=context, choices=(" w10", " w3"), gold=0))
    assert ll[0] > ll[1]


def test_shipped_task_file_is_valid():
    items = load_choice_tasks("phrases")
    assert 20 <= len(items) <= 40 and load_choice_tasks(SHIPPED_TASKS["phrases"]) == items
    golds = {it.gold for it in items}
    assert golds == {0, 1, 2, 3}  # the right answer is not always in one place


@pytest.mark.parametrize(
    "line,match",
    [
        ({"context": "a", "choices": [" b", " c"], "gold": 0, "answer": 1}, r"line 2 has unknown field 'answer'"),
        ({"context": "a", "choices": [" b", " c"]}, r"line 2 is missing field 'gold'"),
        ({"context": "a", "choices": [" b", " c"], "gold": 2}, r"line 2: field 'gold' must be an integer index"),
        ({"context": "a", "choices": [" b"], "gold": 0}, r"line 2: field 'choices'"),
        ({"context": "", "choices": [" b", " c"], "gold": 0}, r"line 2: field 'context'"),
        ("{not json", r"line 2 is not valid JSON"),
        ("[1, 2]", r"line 2 is a list"),
    ],
)
def test_bad_task_lines_name_the_line_and_field(tmp_path, line, match):
    good = {"id": 1, "context": "a", "choices": [" b", " c"], "gold": 1}
    path = _write(tmp_path / "t.jsonl", [good, line])
    with pytest.raises(ValueError, match=match):
        load_choice_tasks(path)


def test_empty_and_missing_task_files(tmp_path):
    with pytest.raises(ValueError, match="no task items"):
        load_choice_tasks(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="phrases"):
        load_choice_tasks(tmp_path / "nope.jsonl")
