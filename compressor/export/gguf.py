"""GGUF export: a Hugging Face decoder as one ``.gguf`` file that llama.cpp (and Ollama, LM Studio, ...) load.

The file holds what llama.cpp's own converter (``convert_hf_to_gguf.py``) writes for the family: the
hyper-parameters under ``{arch}.*``, the tokenizer (``tokenizer.ggml.*``: tokens, their types, BPE merges,
special ids, chat template) and the tensors under llama.cpp's names (``token_embd``, ``blk.{i}.attn_q``, ...,
``output_norm``, ``output``). Quantized tensors are stored in llama.cpp's block formats
(:mod:`compressor.core.gguf_blocks`):

* a linear the ``gguf`` pass quantized (:func:`compressor.core.state.gguf_state`) is written exactly as the
  pass chose it (its dequantized weight in the model is what llama.cpp computes);
* every other matrix gets the format ``mix`` gives it (:func:`compressor.core.gguf_blocks.mix_format`), with
  scales searched per block (:func:`compressor.core.gguf_blocks.choose`, no calibration);
* norms stay float32.

Model knowledge (architecture name, q/k row order, tokenizer names) comes from
:data:`compressor.core.arch.GGUF_ARCHS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core import gguf_blocks
from compressor.core.arch import (GGUF_TENSOR_NAMES, DecoderLayout, find_blocks, gguf_arch, head_counts,
                                  layout_for)
from compressor.core.atomic import atomic_file
from compressor.core.progress import progress
from compressor.core.state import gguf_state, is_experts_quantized, is_quantized

__all__ = ["save_gguf", "load_gguf_weights", "summarize_gguf", "tokenizer_fingerprint", "gguf_missing"]

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4


def gguf_missing() -> str | None:
    """Why GGUF export cannot run here, or None when the ``gguf`` package is installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "GGUF export needs llama.cpp's gguf package: pip install 'compressor[gguf]' (or pip install gguf)"
    return None


def tokenizer_fingerprint(tokenizer_json: dict) -> str:
    """sha256 of a ``tokenizer.json``'s BPE vocabulary, merges (as ``"a b"``) and pre-tokenizer: the key of
    :attr:`compressor.core.arch.GGUFArch.pre_tokenizers`, independent of how the file spells its merges."""
    model = tokenizer_json.get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    key = {"pre_tokenizer": tokenizer_json.get("pre_tokenizer"), "type": model.get("type"),
           "vocab": model.get("vocab"), "merges": merges}
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"GGUF export: rope_type={kind!r} is not written yet (only plain RoPE); "
                         "export compressed-tensors instead")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("GGUF export: the config has no rope_theta")
    return float(theta)


def _permute(rows: torch.Tensor, n_head: int, back: bool = False) -> torch.Tensor:
    """Reorder an (N, …) tensor's rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved
    one: rows (head, 2, d/2) become (head, d/2, 2) (``LlamaModel.permute`` of llama.cpp's converter);
    ``back`` undoes it."""
    n = rows.shape[0]
    split = (n_head, n // n_head // 2, 2) if back else (n_head, 2, n // n_head // 2)
    return rows.reshape(*split, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class _Slot:
    """Where a llama.cpp tensor lives in the model: the module holding it as ``weight``, the heads its rows are
    rope-permuted over (0: not permuted), its role for :func:`compressor.core.gguf_blocks.mix_format` (None: a
    norm, kept float32) and its block index."""

    module: nn.Module
    heads: int
    role: str | None
    layer: int = 0


def _names(model: nn.Module) -> dict[str, _Slot]:
    """llama.cpp tensor name -> :class:`_Slot`, for every tensor the GGUF file of ``model`` holds."""
    arch = gguf_arch(model.config)
    layout = layout_for(model, "GGUF export", "GGUF")
    n_heads, n_kv, _ = head_counts(model.config)
    prefix, blocks = find_blocks(model)
    embed = model.get_input_embeddings()
    out = {"token_embd.weight": _Slot(embed, 0, "token_embd")}
    for i, block in enumerate(blocks):
        for key, module in layout.modules(block, f"{prefix}.{i}", DecoderLayout.BLOCK).items():
            heads = {"q": n_heads, "k": n_kv}.get(key, 0) if arch.rope_permute else 0
            role = None if key in ("attn_norm", "mlp_norm") else GGUF_TENSOR_NAMES[key]
            out[f"blk.{i}.{GGUF_TENSOR_NAMES[key]}.weight"] = _Slot(module, heads, role, i)
    out["output_norm.weight"] = _Slot(model.get_submodule(layout.final_norm), 0, None)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        out["output.weight"] = _Slot(head, 0, "output")
    return out


def load_gguf_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Put a GGUF file's tensors, dequantized by llama.cpp's reader (``gguf.quants``), into a model of the same
    shape (in place): the reference a GGUF export is checked against.

    Returns:
        ``{llama.cpp tensor name: its format}``.

    Raises:
        ValueError: the file's tensors do not match the model's (a name missing on either side, or a shape).
    """
    missing = gguf_missing()
    if missing:
        raise ValueError(missing)
    import gguf
    from gguf.quants import dequantize

    names = _names(model)
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if "output.weight" in found and "output.weight" not in names:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())  # the file has its own output matrix: untie
        names["output.weight"] = _Slot(head, 0, "output")
    if set(found) != set(names):
        raise ValueError(f"{path} does not hold this model's tensors: missing {sorted(set(names) - set(found))[:4]}, "
                         f"unexpected {sorted(set(found) - set(names))[:4]}")
    kinds = {}
    with torch.no_grad():
        for name, t in found.items():
            slot = names[name]
            data = np.asarray(t.data)
            if t.tensor_type.name not in ("F32", "F16", "BF16"):
                data = dequantize(data, t.tensor_type)
            value = torch.from_numpy(np.array(data, dtype=np.float32))
            if slot.heads:
                value = _permute(value, slot.heads, back=True)
            param = slot.module.weight
            if value.shape != param.shape:
                raise ValueError(f"{name}: {tuple(value.shape)} in {path}, {tuple(param.shape)} in the model")
            param.copy_(value.to(param.dtype))
            kinds[name] = t.tensor_type.name
    return kinds


def _tensor(weight: torch.Tensor, fmt: gguf_blocks.BlockFormat | None,
            params: gguf_blocks.Params | None = None) -> tuple[torch.Tensor, gguf_blocks.BlockFormat | None]:
    """``(rows, format)``: (N, K) float32 rows for None, else (N, bytes) uint8 blocks."""
    if fmt is None:
        return weight.detach().float().cpu(), None
    if params is None:
        params = gguf_blocks.choose(fmt, weight.detach().float().cpu())
    return gguf_blocks.encode(fmt, params), fmt


def _vocab(tokenizer: Any, directory: Path, n_vocab: int, arch, pre: str | None) -> tuple[list[str], list[int], str]:
    """Tokens by id, their llama.cpp types and the pre-tokenizer name (``pre``, else from the arch table), from
    a saved fast tokenizer."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ValueError("GGUF export needs a fast (tokenizer.json) BPE tokenizer; this one saved none")
    tj = json.loads(path.read_text(encoding="utf-8"))
    if tj.get("model", {}).get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model) only; this one is "
                         f"{tj.get('model', {}).get('type')!r}")
    fingerprint = tokenizer_fingerprint(tj)
    pre = pre or arch.pre_tokenizers.get(fingerprint)
    if pre is None:
        raise ValueError(f"GGUF export: tokenizer {fingerprint[:16]}… has no llama.cpp pre-tokenizer name in "
                         "compressor.core.arch.GGUF_ARCHS; pass tokenizer_pre=NAME (the tokenizer.ggml.pre "
                         "llama.cpp's convert_hf_to_gguf.py writes for this model) to save_gguf")
    vocab = tokenizer.get_vocab()
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(_CONTROL if added[i].special else _USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_NORMAL)
    return tokens, types, pre


def _hyperparameters(w: Any, config: Any, n_layers: int, file_type: int, n_vocab: int) -> None:
    """The ``general.*`` and ``{arch}.*`` keys llama.cpp's converter writes for a Llama-family config."""
    n_heads, n_kv, head_dim = head_counts(config)
    w.add_type("model")
    w.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    w.add_block_count(n_layers)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(file_type)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(head_dim)


def save_gguf(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any,
    mix: str = "Q4_K_M",
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Write ``model`` as a GGUF file for llama.cpp (atomically: a temporary file renamed into place).

    Args:
        model: a Hugging Face decoder of a family in :data:`compressor.core.arch.GGUF_ARCHS`; its linears may
            carry ``gguf`` pass results (written as chosen), else they are quantized here per ``mix``.
        path: the ``.gguf`` file.
        tokenizer: the model's fast BPE tokenizer.
        mix: :data:`compressor.core.gguf_blocks.MIXES`; ``F32`` writes every tensor unquantized (llama-quantize's
            input). It must be the mix the ``gguf`` pass used, if one ran.
        tokenizer_pre: llama.cpp's pre-tokenizer name when the tokenizer is not in the arch table.
        overwrite: replace an existing file.
        quiet: no progress bar.

    Returns:
        ``{"path", "bytes", "mix", "formats": {format: tensors}, "params": quantized parameters,
        "bits_per_weight": over the quantized matrices}``.

    Raises:
        ValueError: an unsupported family, rope scaling, tokenizer, bias, or a layer quantized by another pass.
    """
    missing = gguf_missing()
    if missing:
        raise ValueError(missing)
    import gguf

    config = model.config
    arch = gguf_arch(config)
    if mix not in gguf_blocks.MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r}: use one of {gguf_blocks.MIXES}")
    for name, module in model.named_modules():
        if is_quantized(module) or is_experts_quantized(module):
            raise ValueError(f"{name} was quantized for the compressed-tensors export, not into a llama.cpp block "
                             "format: quantize with the gguf pass (e.g. --scheme q4_k_m) to write GGUF")
        if isinstance(module, nn.Linear) and module.bias is not None:
            raise ValueError(f"{name} has a bias, which llama.cpp's {arch.name} graph does not read; "
                             "export compressed-tensors instead")
    path = Path(path)
    _rope_theta(config)  # refuse rope scaling before any work
    slots = _names(model)
    n_layers = len(find_blocks(model)[1])
    tied = "output.weight" not in slots
    n_heads, n_kv, _ = head_counts(config)
    gqa = n_heads // n_kv
    n_vocab = model.get_input_embeddings().weight.shape[0]

    entries: list[tuple[str, torch.Tensor, gguf_blocks.BlockFormat | None]] = []
    stats = {"formats": {}, "quantized_params": 0, "quantized_bytes": 0}
    for name, slot in progress(slots.items(), "gguf", quiet=quiet, total=len(slots)):
        weight = slot.module.weight
        if slot.role is None:  # a norm
            entries.append((name, weight.detach().float().cpu(), None))
            continue
        state = gguf_state(slot.module)
        if state is not None:
            fmt, params = state
        else:
            fmt, params = gguf_blocks.mix_format(mix, slot.role, slot.layer, n_layers, weight.shape[1], tied=tied,
                                                 gqa=gqa), None
        rows, fmt = _tensor(weight, fmt, params)
        if slot.heads:
            rows = _permute(rows, slot.heads)
        entries.append((name, rows, fmt))
        key = fmt.name if fmt is not None else "F32"
        stats["formats"][key] = stats["formats"].get(key, 0) + 1
        if fmt is not None:
            stats["quantized_params"] += weight.numel()
            stats["quantized_bytes"] += rows.numel()

    quiet_writer = logging.getLogger("gguf")  # its INFO lines repeat what we log below
    level = quiet_writer.level
    quiet_writer.setLevel(max(level, logging.WARNING))
    try:
        with tempfile.TemporaryDirectory() as tmp, atomic_file(path, overwrite) as out:
            tokenizer.save_pretrained(tmp)
            tokens, types, pre = _vocab(tokenizer, Path(tmp), n_vocab, arch, tokenizer_pre)
            w = gguf.GGUFWriter(str(out), arch.name)
            _hyperparameters(w, config, n_layers, gguf_blocks.FILE_TYPES[mix], n_vocab)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types(types)
            special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
            # whether the tokenizer adds BOS (and EOS), when its saved config does not say: llama.cpp's default differs
            probe, bos, eos = tokenizer("x")["input_ids"], tokenizer.bos_token_id, tokenizer.eos_token_id
            special.add_special_token.setdefault("bos", bos is not None and probe[:1] == [bos])
            if eos is not None and probe[-1:] == [eos]:
                special.add_special_token.setdefault("eos", True)
            special.add_to_gguf(w, quiet=True)
            for name, rows, fmt in entries:
                if fmt is None:
                    w.add_tensor(name, rows.numpy())
                else:
                    w.add_tensor(name, rows.numpy(), raw_dtype=gguf.GGMLQuantizationType[fmt.name])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            w.close()
    finally:
        quiet_writer.setLevel(level)
    size = path.stat().st_size
    q = stats["quantized_params"]
    info = {"path": str(path), "bytes": size, "mix": mix, "formats": stats["formats"], "params": q,
            "bits_per_weight": round(8 * stats["quantized_bytes"] / q, 4) if q else None}
    log.info("gguf %s: %s, %.1f MB%s", path, ", ".join(f"{n} {k}" for k, n in sorted(stats["formats"].items())),
             size / 1e6, f", {info['bits_per_weight']} bits per quantized weight" if q else "")
    return info


def summarize_gguf(path: str | Path) -> dict:
    """``compressor inspect`` of a GGUF file, without dequantizing: the keys of
    :func:`compressor.export.summary.summarize` (``schemes`` by block format, ``loaders`` llama.cpp's)."""
    missing = gguf_missing()
    if missing:
        raise ValueError(missing)
    import gguf

    path = Path(path)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    params = qparams = qbits = 0
    tensors_of: dict[str, int] = {}  # block format -> tensors stored in it
    for t in reader.tensors:
        n = int(np.prod(t.shape))
        params += n
        kind = t.tensor_type.name
        if kind not in ("F32", "F16", "BF16"):
            qparams += n
            qbits += 8 * int(t.n_bytes)
            tensors_of[kind] = tensors_of.get(kind, 0) + 1
    quantized = sum(tensors_of.values())
    schemes = {k: {"scheme": f"llama.cpp {k}", "targets": f"{n} tensors"} for k, n in tensors_of.items()}
    size = path.stat().st_size
    return {"path": str(path), "architecture": f"GGUF {arch}", "size_bytes": size, "weights_bytes": size,
            "params": params, "quantized_layers": quantized,
            "bits_per_weight": round(qbits / qparams, 4) if qparams else None,
            "model_bits_per_param": round(8 * size / params, 4) if params else None, "schemes": schemes,
            "ignore": [], "loaders": ["llama.cpp, Ollama, LM Studio (GGUF)", "compressor load_gguf_weights"],
            "coverage": None}
