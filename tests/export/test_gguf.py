"""GGUF export (compressor.export.gguf) and the gguf pass, read back with llama.cpp's own reader (``gguf``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.core import gguf_blocks as gb

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402


VOCAB = 2048  # the first 2048 of SmolLM2's tokens: small embeddings, a file gguf still reads


def _model(vocab: int, layers: int = 2, tie: bool = True, seed: int = 0):
    """A random Llama whose rows are a multiple of 256 (K-quants apply) except for the Q5_0 fallbacks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from compressor.api import load_tokenizer

    return load_tokenizer(smollm2_path)


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type.name not in ("F32", "F16"):
            data = gguf_dequantize(data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(data, dtype=np.float32)))
    return fields, tensors


def _hf_to_llama_rows(w, n_head):
    n = w.shape[0]
    return w.reshape(n_head, 2, n // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_f32_file_holds_the_model_under_llama_cpp_names(tokenizer, tmp_path):
    from compressor.export.gguf import save_gguf

    model = _model(VOCAB)
    info = save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, mix="F32", quiet=True)
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 256 and fields["llama.feed_forward_length"] == 512
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(fields["tokenizer.ggml.merges"]) == 48900
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    attn = model.model.layers[1].self_attn
    assert torch.equal(tensors["blk.1.attn_q.weight"][1], _hf_to_llama_rows(attn.q_proj.weight.detach(), 4))
    assert torch.equal(tensors["blk.1.attn_k.weight"][1], _hf_to_llama_rows(attn.k_proj.weight.detach(), 2))
    assert torch.equal(tensors["blk.1.attn_v.weight"][1], attn.v_proj.weight.detach())
    assert torch.equal(tensors["blk.0.ffn_down.weight"][1], model.model.layers[0].mlp.down_proj.weight.detach())
    assert torch.equal(tensors["output_norm.weight"][1], model.model.norm.weight.detach())
    assert info["formats"] == {"F32": 15} and info["bits_per_weight"] is None


@pytest.mark.parametrize("mix, method", [("Q4_K_M", "gptq"), ("Q4_K_M", "nearest"), ("Q3_K_M", "gptq"),
                                         ("Q2_K", "gptq"), ("Q5_K_M", "nearest")])
def test_gguf_pass_is_written_bit_for_bit_and_matches_the_model_in_memory(tokenizer, tmp_path, mix, method):
    """The file's tensors, dequantized by gguf, equal the compressed model's weights; the mix as llama-quantize's."""
    from compressor.api import compress
    from compressor.recipe import Recipe

    model = _model(VOCAB, layers=4, tie=False)
    calib = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.from_dict({"passes": [{"gguf": {"mix": mix, "method": method}}]})
    compress(model, recipe, calibration=calib, tokenizer=tokenizer, output=tmp_path / "m.gguf", quiet=True)
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == gb.FILE_TYPES[mix]
    for i, layer in enumerate(model.model.layers):
        for role, module, heads in (("attn_q", layer.self_attn.q_proj, 4), ("attn_k", layer.self_attn.k_proj, 2),
                                    ("attn_v", layer.self_attn.v_proj, 0), ("ffn_down", layer.mlp.down_proj, 0),
                                    ("ffn_up", layer.mlp.up_proj, 0)):
            kind, data = tensors[f"blk.{i}.{role}.weight"]
            expect = gb.mix_format(mix, role, i, 4, module.weight.shape[1], gqa=2).name
            assert kind == expect, (i, role)
            w = module.weight.detach()
            assert torch.equal(data, _hf_to_llama_rows(w, heads) if heads else w), (i, role)
    attn_v = {"Q4_K_M": ["Q4_K", "Q4_K", "Q6_K", "Q6_K"], "Q3_K_M": ["Q5_K", "Q5_K", "Q4_K", "Q4_K"],
              "Q2_K": ["Q3_K"] * 4, "Q5_K_M": ["Q5_K", "Q5_K", "Q6_K", "Q6_K"]}[mix]
    assert [tensors[f"blk.{i}.attn_v.weight"][0] for i in range(4)] == attn_v
    assert tensors["output.weight"][0] == "Q6_K" and tensors["token_embd.weight"][0] == {"Q2_K": "Q2_K"}.get(mix, mix[:4])
    # read back through llama.cpp's reader into a fresh model: the same logits as the model in memory,
    # whose embeddings and output matrix the writer quantized too
    from compressor.export.gguf import load_gguf_weights

    fresh = _model(VOCAB, layers=4, tie=False, seed=1)
    kinds = load_gguf_weights(fresh, tmp_path / "m.gguf")
    assert kinds["blk.0.attn_norm.weight"] == "F32" and len(kinds) == 4 * 9 + 3
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        if "embed_tokens" in name or "lm_head" in name:
            continue  # quantized by the writer, not the pass: compared below through the file
        assert torch.equal(a, b), name
    assert torch.equal(fresh.lm_head.weight, tensors["output.weight"][1])


def test_gptq_codes_lower_the_output_error_of_nearest_codes(tokenizer):
    """On the same calibration, the gguf pass with GPTQ leaves a smaller layer output error than nearest codes."""
    from compressor.api import compress
    from compressor.recipe import Recipe

    calib = torch.randint(0, VOCAB, (32, 128), generator=torch.Generator().manual_seed(1))
    ref = _model(VOCAB, layers=2)
    ids = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(2))  # held out
    with torch.no_grad():
        base = ref(ids).logits
    errs = {}
    for method in ("nearest", "gptq"):
        model = _model(VOCAB, layers=2)
        compress(model, Recipe.from_dict({"passes": [{"gguf": {"mix": "Q4_K_M", "method": method}}]}),
                 calibration=calib, tokenizer=tokenizer, quiet=True)
        with torch.no_grad():
            errs[method] = (model(ids).logits - base).pow(2).mean().item()
    assert errs["gptq"] < errs["nearest"]


def test_bad_gguf_requests_are_refused_before_any_work(tokenizer, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from compressor.api import compress
    from compressor.export.gguf import save_gguf
    from compressor.recipe import Recipe

    recipe = Recipe.from_dict({"passes": [{"gguf": {}}]})
    with pytest.raises(ValueError, match=r"name it \*\.gguf"):
        compress(_model(64), recipe, calibration=torch.zeros(1, 8, dtype=torch.long), output=tmp_path / "out")
    both = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4}}}, {"gguf": {}}]})
    with pytest.raises(ValueError, match="drop"):
        compress(_model(64), both, output=tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="gguf mix"):
        Recipe.from_dict({"passes": [{"gguf": {"mix": "F32"}}]}).build()
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="GGUF_ARCHS"):
        save_gguf(qwen, tmp_path / "q.gguf", tokenizer=tokenizer)
    from tests.helpers import tiny_tokenizer

    with pytest.raises(ValueError, match="byte-level BPE"):
        save_gguf(_model(96), tmp_path / "w.gguf", tokenizer=tiny_tokenizer(), mix="F32")
    assert not (tmp_path / "w.gguf").exists()
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        save_gguf(_model(VOCAB), tmp_path / "exists.gguf", tokenizer=tokenizer, mix="F32")
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"


def test_an_unknown_bpe_tokenizer_needs_its_llama_cpp_name(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compressor.export.gguf import save_gguf

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "c": 3}, merges=[("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    with pytest.raises(ValueError, match="tokenizer_pre=NAME"):
        save_gguf(_model(4), tmp_path / "m.gguf", tokenizer=tok, mix="F32")
    save_gguf(_model(4), tmp_path / "m.gguf", tokenizer=tok, mix="F32", tokenizer_pre="gpt2")
    fields, _ = _read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.pre"] == "gpt2" and fields["tokenizer.ggml.tokens"] == ["a", "b", "ab", "c"]
    assert fields["tokenizer.ggml.merges"] == ["a b"]


def test_cli_writes_a_q4_k_m_file(smollm2_path, tokenizer, tmp_path):
    from compressor.cli import main

    src = tmp_path / "tiny"
    _model(len(tokenizer)).save_pretrained(src)  # the calibration text tokenizes to any id
    tokenizer.save_pretrained(src)
    (tmp_path / "calib.txt").write_text("The state of the union is strong. " * 200)
    out = tmp_path / "tiny-Q4_K_M.gguf"
    rc = main(["compress", str(src), "--scheme", "q4_k_m", "--method", "gptq", "--calibration",
               str(tmp_path / "calib.txt"), "--num-samples", "4", "--seq-len", "64", "-o", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    fields, tensors = _read(out)
    assert main(["inspect", str(out)]) == 0
    from compressor.inspect import summarize

    info = summarize(out)
    assert info["quantized_layers"] == 2 * 7 + 1 and "Q6_K" in info["schemes"]
    assert 4.5 < info["bits_per_weight"] < 8.5
    assert fields["general.file_type"] == 15
    assert [tensors[f"blk.{i}.ffn_down.weight"][0] for i in range(2)] == ["Q4_K", "Q6_K"]
