"""Model structure discovery: the one place that knows where decoder blocks and their parts live."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["find_blocks", "DecoderLayout", "LAYOUTS", "layout_for"]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks of a model.

    Looks for the ``nn.ModuleList`` whose children are instances of the classes
    named in ``model._no_split_modules`` (set by Hugging Face models), and falls
    back to the largest ``nn.ModuleList`` by parameter count.

    Returns:
        ``(qualified name, module list)``, e.g. ``("model.layers", ModuleList)``.

    Raises:
        ValueError: no ``nn.ModuleList`` exists (an unsupported architecture).
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks: the sequential pipeline cannot find its "
            "decoder layers; use a calibration-free pass (rtn) or open an issue with the architecture"
        )
    if no_split:
        hits = [(n, m) for n, m in lists if all(type(b).__name__ in no_split for b in m)]
        if hits:
            return max(hits, key=lambda nm: len(nm[1]))
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


@dataclass(frozen=True)
class DecoderLayout:
    """Where a decoder family keeps the modules rotations touch.

    ``final_norm`` is relative to the model; the others are relative to one
    decoder block (blocks come from :func:`compressor.core.arch.find_blocks`; the
    embedding and ``lm_head`` from ``get_input_embeddings`` /
    ``get_output_embeddings``).
    """

    final_norm: str
    attn_norm: str
    q: str
    k: str
    v: str
    o: str
    mlp_norm: str
    gate: str
    up: str
    down: str


_LLAMA_LIKE = DecoderLayout(
    final_norm="model.norm", attn_norm="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj",
    v="self_attn.v_proj", o="self_attn.o_proj", mlp_norm="post_attention_layernorm", gate="mlp.gate_proj",
    up="mlp.up_proj", down="mlp.down_proj",
)

# keyed by config.model_type; Qwen3's per-head q_norm/k_norm act after q/k_proj and are untouched by R1/R2
LAYOUTS: dict[str, DecoderLayout] = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE}


def layout_for(model: nn.Module) -> DecoderLayout:
    """The :class:`DecoderLayout` of ``model`` from ``model.config.model_type``.

    Raises:
        ValueError: the family has no entry in :data:`LAYOUTS`.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(
            f"rotate: no rotation layout for model_type={model_type!r} ({type(model).__name__}); supported: "
            f"{sorted(LAYOUTS)} (RMSNorm decoders). Add a DecoderLayout to compressor.core.arch.LAYOUTS "
            "for another RMSNorm family, or drop the rotate pass"
        )
    return LAYOUTS[model_type]
