"""Shared fixtures: tiny random Hugging Face models and the real SmolLM2 fixture (helpers: ``tests/helpers.py``)."""

from __future__ import annotations

import os

# Triton fixes compiled-or-interpreted when it is first imported (torch._dynamo imports it):
# set the interpreter before anything does, so tests/test_kernels runs the kernels on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import WORDS, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path():
    """The fp32 SmolLM2-135M directory, built once into ~/.cache/compressor (about a minute)."""
    from compressor.fixtures import smollm2_dir

    return smollm2_dir()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama with a tokenizer, plus a text file of 600 words."""
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[i] for i in torch.randint(0, 95, (600,), generator=g).tolist())
    (tmp_path / "text.txt").write_text(text)
    return path
