"""Shared fixtures: tiny random Hugging Face models and the real SmolLM2 fixture."""

from __future__ import annotations

import os

# Triton fixes compiled-or-interpreted when it is first imported (torch._dynamo imports it):
# set the interpreter before anything does, so tests/kernels runs the kernels on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_llama(vocab: int = 96, hidden: int = 64, inter: int = 80, layers: int = 2, tie: bool = True, seed: int = 0):
    """A random Llama with widths chosen so group 32 is ragged on the MLP (80 = 2*32 + 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path():
    """The fp32 SmolLM2-135M directory, built once into ~/.cache/compressor (about a minute)."""
    from compressor.fixtures import smollm2_dir

    return smollm2_dir()


WORDS = [f"w{i}" for i in range(95)]


def tiny_tokenizer():
    """A word-level tokenizer over ``WORDS`` (+ [UNK] = id 95), vocabulary 96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


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
