"""Hub repo ids wherever a model directory is accepted, from a Hub cache built in a temp dir (no network)."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import constants

from compressor import load_compressed
from compressor.api import evaluate, load_model, load_tokenizer
from compressor.cli import main
from compressor.distill import load_student
from compressor.core.hub import looks_like_repo_id, resolve_model
from tests.helpers import tiny_llama, tiny_tokenizer

MAIN, V1 = "a" * 40, "b" * 40


def _snapshot(cache, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",), seed: int = 0):
    """A cache entry as huggingface_hub lays it out: refs/<name> holds the commit, snapshots/<commit>/ the files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    folder = repo / "snapshots" / commit
    tiny_llama(seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache with ``acme/tiny-llama`` at main and at tag v1 (other weights)."""
    cache = tmp_path / "hub"
    main_folder = _snapshot(cache, "acme/tiny-llama", MAIN)
    v1_folder = _snapshot(cache, "acme/tiny-llama", V1, refs=("v1",), seed=1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, main_folder, v1_folder


def test_repo_ids_resolve_to_cached_snapshots(hub):
    cache, main_folder, v1_folder = hub
    assert resolve_model("acme/tiny-llama") == main_folder
    assert resolve_model("acme/tiny-llama", revision="v1") == v1_folder
    assert resolve_model("acme/tiny-llama", revision=V1) == v1_folder
    assert resolve_model(main_folder) == main_folder  # a directory is itself
    a, b = load_model("acme/tiny-llama"), load_model("acme/tiny-llama", revision="v1")
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
    assert load_tokenizer("acme/tiny-llama").get_vocab() == tiny_tokenizer().get_vocab()


def test_cli_compress_and_eval_take_a_repo_id(hub, tmp_path, tiny_model_dir):
    out = tmp_path / "w4"
    assert main(["compress", "acme/tiny-llama", "--revision", "v1", "--scheme", "w4a16", "--group-size", "32",
                 "--output", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "compressor_manifest.json").read_text())
    assert manifest["source_model"].endswith(f"models--acme--tiny-llama/snapshots/{V1}")  # id and commit on record
    model = load_compressed(out)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = load_model("acme/tiny-llama", revision="v1")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=0.5)  # W4 of the v1 weights, not main's
    text = tiny_model_dir.parent / "text.txt"
    result = evaluate("acme/tiny-llama", dataset=str(text), ctx=32, max_tokens=128, quiet=True)
    assert result.ppl > 1 and result.tokens > 0
    assert main(["eval", "acme/tiny-llama", str(out), "--dataset", str(text), "--ctx", "32", "--max-tokens", "128",
                 "--decode-tokens", "0", "--json", str(tmp_path / "rows.json"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["tiny-llama", "w4"]
    assert load_student("acme/tiny-llama") is not None


def test_offline_without_a_cached_copy_names_the_id_the_cache_and_the_fix(hub, caplog):
    cache = hub[0]
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("acme/missing", revision="v2")
    text = str(err.value)
    assert "'acme/missing' at revision 'v2'" in text and str(cache) in text and "HF_HUB_OFFLINE is set" in text
    assert "hf download acme/missing --revision v2" in text
    assert main(["compress", "acme/missing", "--scheme", "w4a16", "--output", str(cache.parent / "o")]) == 2
    assert "hf download acme/missing" in caplog.text and not (cache.parent / "o").exists()


def test_unreachable_hub_without_a_cached_copy(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(FileNotFoundError, match="the Hub cannot be reached.*hf download acme/missing"):
        resolve_model("acme/missing")


def test_pickled_weights_are_refused(hub, tmp_path):
    cache, main_folder, _ = hub
    local = tmp_path / "bin-only"
    local.mkdir()
    (local / "config.json").write_text((main_folder / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, local / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled PyTorch weights.*safetensors only.*save_pretrained"):
        load_model(local)
    repo = cache / "models--acme--bin-only"
    (repo / "snapshots" / MAIN).mkdir(parents=True)
    (repo / "snapshots" / MAIN / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights.*refs/pr/N"):
        resolve_model("acme/bin-only")


def test_remote_code_needs_an_explicit_opt_in(tmp_path):
    folder = tmp_path / "custom"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="acme_custom", auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_model(folder)


def test_revision_with_a_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="local directory"):
        resolve_model(tmp_path, revision="v1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing" / "model")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a model directory"):
        resolve_model(tmp_path / "weights.safetensors")


@pytest.mark.parametrize("name,is_id", [("Qwen/Qwen3-0.6B", True), ("gpt2", True), ("./model", False),
                                        ("/abs/path", False), ("a/b/c", False), ("../up", False), ("org/", False)])
def test_looks_like_repo_id(name, is_id):
    assert looks_like_repo_id(name) is is_id
