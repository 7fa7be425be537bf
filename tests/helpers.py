"""Helpers the tests import (``from tests.helpers import tiny_llama``): tiny random models, a word tokenizer,
the benchmark modules, a two-process ``accelerate launch``. Fixtures live in ``tests/conftest.py``."""

from __future__ import annotations

import importlib

import torch


def tiny_llama(vocab: int = 96, hidden: int = 64, inter: int = 80, layers: int = 2, tie: bool = True, seed: int = 0):
    """A random Llama with widths chosen so group 32 is ragged on the MLP (80 = 2*32 + 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def load_benchmark(name: str):
    """The module ``benchmarks.<name>`` (``benchmarks`` is a package at the repository root)."""
    return importlib.import_module(f"benchmarks.{name}")


WORDS = [f"w{i}" for i in range(95)]


def tiny_tokenizer():
    """A word-level tokenizer over ``WORDS`` (+ [UNK] = id 95), vocabulary 96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def launch_two_cpu_processes(args: list[str], tmp_path, timeout: int = 180):
    """Run ``compressor.cli args`` under ``accelerate launch`` with 2 CPU processes (gloo); returns the CompletedProcess.

    ``--multi_gpu --num_processes 2`` starts two processes (``--cpu`` would start one);
    ``ACCELERATE_USE_CPU=1`` keeps them on CPU. A free port and a private HF_HOME per test.
    """
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                        "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "compressor.cli"]
    return subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=timeout)
