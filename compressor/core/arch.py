"""Model knowledge: the one place that knows where decoder blocks and their parts live, how heads are sized,
which modules are attention and how transformers dispatches them.

Families are data (:data:`LAYOUTS`), not per-model code; every other module asks
here instead of naming ``self_attn`` or rewriting a config itself.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "find_blocks", "DecoderLayout", "LAYOUTS", "LAYOUT_FEATURES", "layout_for", "layout_of_config", "head_counts", "set_config_shapes",
    "resize_mlp", "resize_attention", "block_config", "attention_head_dim", "attention_modules",
    "eager_attention", "base_attention", "register_attention", "attention_function", "set_attention",
    "attention_implementation", "set_attention_implementation", "PARAM_KINDS", "parameter_kinds",
    "ExpertsLayout", "GATE_UP_DOWN", "experts_layout", "is_experts_module", "EXPERT_CHECKPOINT_NAMES",
    "expert_checkpoint_names", "ROUTER_NAME", "EXPERT_COUNT_KEYS", "ROUTER_EXPERT_BUFFERS", "ROUTER_GROUP_KEYS",
    "moe_parts", "set_expert_count",
    "WRAPPABLE_ATTENTION", "GGUFArch", "GGUF_ARCHS", "GGUF_TENSOR_NAMES", "gguf_arch",
]

log = logging.getLogger(__name__)


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

    A family whose ``q``, ``k`` and ``v`` name one module keeps them fused (Phi-3's
    ``qkv_proj``, rows q then k then v); ``gate`` equal to ``up`` is a fused
    ``gate_up_proj`` (rows gate then up). ``norm_offset`` is what the norms add to
    their weight (Gemma's RMSNorm scales by ``1 + w``). ``post_norms`` are norms on
    the attention and MLP outputs before the residual add (Gemma 2/3's sandwich);
    their per-channel weights do not commute with a rotation of the residual
    stream. ``experts`` / ``router`` are the fused MoE experts and the router of a
    block whose MLP is a mixture of experts (blocks without them have the dense
    ``gate`` / ``up`` / ``down``). :attr:`features` names what a consumer must
    handle beyond the Llama layout; :func:`layout_for` refuses a layout whose
    features its caller does not list.
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
    qk_norm: str | None = None  # per-head query norm after q_proj (Qwen3, Gemma 3), None when absent
    norm_offset: float = 0.0
    post_norms: tuple[str, ...] = ()
    experts: str | None = None
    router: str | None = None

    # the per-block fields, in forward order
    BLOCK: ClassVar[tuple[str, ...]] = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
    LINEARS: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "gate", "up", "down")
    ATTENTION: ClassVar[tuple[str, ...]] = ("attn_norm", "q", "k", "v", "o", "mlp_norm")

    @property
    def fused_qkv(self) -> bool:
        """Whether q, k and v are one linear (rows: q, then k, then v)."""
        return self.q == self.k == self.v

    @property
    def fused_gate_up(self) -> bool:
        """Whether gate and up are one linear (rows: gate, then up)."""
        return self.gate == self.up

    @property
    def features(self) -> frozenset[str]:
        """What this layout has beyond the Llama one: a subset of :data:`LAYOUT_FEATURES`' keys."""
        have = {"norm_offset": self.norm_offset != 0.0, "post_norms": bool(self.post_norms),
                "fused_qkv": self.fused_qkv, "fused_gate_up": self.fused_gate_up, "experts": self.experts is not None}
        return frozenset(k for k, v in have.items() if v)

    def modules(self, block: nn.Module, where: str, keys: tuple[str, ...] = BLOCK) -> dict[str, nn.Module]:
        """``{field: module}`` of one decoder block (``where`` names the block in errors).

        Fused fields (``q``/``k``/``v`` of a ``qkv_proj``) map to the same module.

        Raises:
            ValueError: the block has no module at one of the layout's paths.
        """
        out = {}
        for key in keys:
            try:
                out[key] = block.get_submodule(getattr(self, key))
            except AttributeError:
                raise ValueError(f"{where} has no module {getattr(self, key)!r}; the architecture does not match "
                                 "its layout in compressor.core.arch.LAYOUTS") from None
        return out

    def moe_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """``(router, experts)`` of a block whose MLP is a mixture of experts, else None (a dense block)."""
        if self.experts is None:
            return None
        try:
            return block.get_submodule(self.router), block.get_submodule(self.experts)
        except AttributeError:
            return None

    def v_rows(self, n_heads: int, n_kv: int, head_dim: int) -> slice:
        """The rows of the ``v`` module's weight that are the values: all of them, or the last
        ``n_kv * head_dim`` rows of a fused ``qkv_proj`` (after ``n_heads`` query and ``n_kv`` key heads)."""
        if not self.fused_qkv:
            return slice(0, n_kv * head_dim)
        start = (n_heads + n_kv) * head_dim
        return slice(start, start + n_kv * head_dim)

    def has_qk_norm(self, block: nn.Module) -> bool:
        """Whether ``block`` normalizes queries (and keys) per head after their projections."""
        if self.qk_norm is None:
            return False
        try:
            block.get_submodule(self.qk_norm)
        except AttributeError:
            return False
        return True

    @property
    def attention(self) -> str:
        """The attention module's path inside a block (the parent of ``q``)."""
        return self.q.rpartition(".")[0]

    @property
    def mlp(self) -> str:
        """The MLP module's path inside a block (the parent of ``down``)."""
        return self.down.rpartition(".")[0]


# what each DecoderLayout feature means, for refusals
LAYOUT_FEATURES: dict[str, str] = {
    "norm_offset": "RMSNorms that scale by 1 + w",
    "post_norms": "norms on the attention and MLP outputs (sandwich norms)",
    "fused_qkv": "a fused qkv_proj",
    "fused_gate_up": "a fused gate_up_proj",
    "experts": "mixture-of-experts MLPs",
}

_LLAMA_LIKE = DecoderLayout(
    final_norm="model.norm", attn_norm="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj",
    v="self_attn.v_proj", o="self_attn.o_proj", mlp_norm="post_attention_layernorm", gate="mlp.gate_proj",
    up="mlp.up_proj", down="mlp.down_proj",
)
# Gemma 2 / 3: input_layernorm -> attention -> post_attention_layernorm -> + residual;
# pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> + residual; norms scale by 1 + w
_GEMMA = replace(_LLAMA_LIKE, mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
# Qwen3-MoE (its mlp_only_layers are dense), Mixtral, OLMoE: mlp.gate is the router (weight (E, H)), mlp.experts
# the fused experts (arch.GATE_UP_DOWN)
_MOE = dict(experts="mlp.experts", router="mlp.gate")

# keyed by config.model_type; Qwen3's per-head q_norm/k_norm act after q/k_proj and are untouched by R1/R2
LAYOUTS: dict[str, DecoderLayout] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
    "qwen3": replace(_LLAMA_LIKE, qk_norm="self_attn.q_norm"),
    "gemma2": _GEMMA,
    "gemma3_text": replace(_GEMMA, qk_norm="self_attn.q_norm"),
    "phi3": replace(_LLAMA_LIKE, q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj",
                    gate="mlp.gate_up_proj", up="mlp.gate_up_proj"),
    "qwen3_moe": replace(_LLAMA_LIKE, qk_norm="self_attn.q_norm", **_MOE),
    "mixtral": replace(_LLAMA_LIKE, **_MOE),
    "olmoe": replace(_LLAMA_LIKE, **_MOE),  # its q_norm / k_norm span all heads, after q/k_proj: untouched by R1/R2
}


# linears that runtimes fuse into one matmul (vLLM's packed_modules_mapping: qkv_proj, gate_up_proj); a format with a
# per-matrix scale (NVFP4's global scale) must give the members of one fused group the same one, since vLLM keeps a
# single scale per fused layer (the largest of its shards')
FUSED_SHARDS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                             ("w1", "w3"), ("query", "key", "value"))


def fused_groups(names: list[str]) -> list[list[str]]:
    """``names`` (module paths) grouped as runtimes fuse them: siblings under one parent whose leaf names are one
    :data:`FUSED_SHARDS` entry's members form a group; every other name is a group of its own. Order kept."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        shard = next((i for i, members in enumerate(FUSED_SHARDS) if leaf in members), None)
        key = (parent, shard) if shard is not None else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def layout_for(model: nn.Module, who: str = "rotate", kind: str = "rotation",
               supports: frozenset[str] = frozenset()) -> DecoderLayout:
    """The :class:`DecoderLayout` of ``model`` from ``model.config.model_type``.

    Raises:
        ValueError: the family has no entry in :data:`LAYOUTS`, or its layout has
            :attr:`DecoderLayout.features` outside ``supports`` (``who`` names the pass that needed it,
            ``kind`` what it needed the layout for).
    """
    return layout_of_config(getattr(model, "config", None), who, type(model).__name__, kind, supports)


def layout_of_config(config: Any, who: str, what: str | None = None, kind: str = "decoder",
                     supports: frozenset[str] = frozenset()) -> DecoderLayout:
    """The :class:`DecoderLayout` of a Hugging Face config's ``model_type``.

    Args:
        supports: the :data:`LAYOUT_FEATURES` the caller handles; a layout with any other is refused.

    Raises:
        ValueError: the family has no entry in :data:`LAYOUTS`, or has a feature the caller does not handle.
    """
    model_type = getattr(config, "model_type", None)
    plain = sorted(t for t, lay in LAYOUTS.items() if not lay.features - supports)
    if model_type not in LAYOUTS:
        raise ValueError(
            f"{who}: no {kind} layout for model_type={model_type!r}{f' ({what})' if what else ''}; supported: "
            f"{plain} (RMSNorm decoders with a gated MLP). Add a DecoderLayout to "
            f"compressor.core.arch.LAYOUTS for another such family, or drop the {who} pass"
        )
    layout = LAYOUTS[model_type]
    missing = [f for f in LAYOUT_FEATURES if f in layout.features - supports]
    if missing:
        raise ValueError(
            f"{who}: model_type={model_type!r} has {', '.join(LAYOUT_FEATURES[f] for f in missing)}, which {who} "
            f"does not handle yet; supported families: {plain}. Drop the {who} pass for this model"
        )
    return layout


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names a family in a GGUF file.

    Attributes:
        name: ``general.architecture`` (also the prefix of the family's hyper-parameter keys).
        rope_permute: q/k rows are reordered from Hugging Face's half-split rotary layout to the interleaved
            one llama.cpp's ``llama`` graph expects (``LlamaModel.permute`` in llama.cpp's
            ``conversion/llama.py``): rows ``(head, 2, d/2)`` become ``(head, d/2, 2)``.
        pre_tokenizers: a tokenizer's fingerprint (sha256 of its BPE vocabulary, merges and pre-tokenizer,
            :func:`compressor.export.gguf.tokenizer_fingerprint`) -> the ``tokenizer.ggml.pre`` name llama.cpp's
            converter gives it (it too recognises a tokenizer by what it is, a hash of its output on a probe text).
    """

    name: str
    rope_permute: bool
    pre_tokenizers: dict[str, str]


# SmolLM / SmolLM2's tokenizer (all sizes share it); llama.cpp's converter calls it "smollm"
_PRE_TOKENIZERS = {"07a708090cd86dd463f51cc1960ffe6d83abda3356623db6a3446a6300bc3180": "smollm"}

# keyed by config.model_type; checked against llama.cpp's own converter and runtime for llama (SmolLM2):
# benchmarks/gguf_compare.py. Mistral's Hugging Face layout converts the same way (llama.cpp's MistralModel
# is a LlamaModel).
GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", True, _PRE_TOKENIZERS),
    "mistral": GGUFArch("llama", True, _PRE_TOKENIZERS),
}

# DecoderLayout field -> llama.cpp's name for the tensor inside block ``blk.{i}``
GGUF_TENSOR_NAMES = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                     "mlp_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def gguf_arch(config: Any) -> GGUFArch:
    """The :class:`GGUFArch` of a Hugging Face config.

    Raises:
        ValueError: the family has no entry in :data:`GGUF_ARCHS`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise ValueError(f"GGUF export: model_type={model_type!r} has no entry in compressor.core.arch.GGUF_ARCHS "
                         f"(supported: {sorted(GGUF_ARCHS)}); export it as compressed-tensors instead (drop the gguf "
                         "pass), or add the family after checking its tensor names with llama.cpp's converter")
    return GGUF_ARCHS[model_type]


def head_counts(config: Any) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` of a Hugging Face config.

    ``head_dim`` is the config's own when it has one (after head pruning, or Gemma's), else
    ``hidden_size // num_attention_heads``.
    """
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def set_config_shapes(config: Any, *, intermediate_size: int | None = None, num_heads: int | None = None,
                      num_kv_heads: int | None = None, head_dim: int | None = None) -> dict[str, int]:
    """Write the shrunk sizes into a Hugging Face config (in place); None leaves a field as it is.

    ``head_dim`` is always written explicitly once heads change: after head
    removal ``hidden_size // num_attention_heads`` no longer gives it.

    Returns:
        ``{config field: new value}`` for the fields whose value changed.
    """
    changed = {}
    for field, value in (("intermediate_size", intermediate_size), ("num_attention_heads", num_heads),
                         ("num_key_value_heads", num_kv_heads), ("head_dim", head_dim)):
        if value is not None:
            if getattr(config, field, None) != int(value):
                changed[field] = int(value)
            setattr(config, field, int(value))
    return changed


def resize_mlp(mlp: nn.Module, intermediate_size: int) -> None:
    """Tell a gated MLP module (whose linears were already sliced) its new intermediate size."""
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size


def resize_attention(attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Tell an attention module (whose projections were already sliced) its new head counts.

    transformers 5.x attention reads ``head_dim`` and ``num_key_value_groups``; older
    versions also ``num_heads``, ``num_key_value_heads`` and ``hidden_size``.
    """
    attention.num_key_value_groups = num_heads // num_kv_heads
    for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                        ("hidden_size", num_heads * head_dim)):
        if hasattr(attention, attr):
            setattr(attention, attr, value)


def block_config(block: nn.Module) -> Any:
    """The model config a Hugging Face block's submodules hold (attention and MLP keep ``self.config``).

    Raises:
        ValueError: no submodule holds a config with a ``model_type``.
    """
    for module in block.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) is not None:
            return config
    raise ValueError(f"{type(block).__name__} holds no Hugging Face config: this needs a transformers decoder "
                     "(its attention/MLP modules keep model.config)")


def attention_head_dim(attention: nn.Module, config: Any) -> int:
    """The head width an attention module works with: its own ``head_dim``, else the config's (:func:`head_counts`)."""
    return int(getattr(attention, "head_dim", None) or head_counts(config)[2])


# ---------------------------------------------------------------- fused MoE experts


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused-experts module stores its experts (transformers 5: one 3-D parameter per projection).

    ``params`` maps each fused parameter, (E, N, K) with every expert's matrix in ``nn.Linear``
    orientation (out, in), to the per-expert linears its rows split into, in order, as checkpoints
    and vLLM name them (``experts.{e}.gate_proj``...): ``gate_up_proj`` (E, 2I, H) holds ``gate_proj``
    then ``up_proj``; ``down_proj`` (E, H, I) is ``down_proj``.
    """

    params: tuple[tuple[str, tuple[str, ...]], ...]

    def splits(self, param: str) -> tuple[str, ...]:
        return dict(self.params)[param]

    def inputs(self, module: nn.Module, expert: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each fused parameter of ``expert`` multiplies when the expert gets tokens ``x`` (T, H):
        ``{"gate_up_proj": x, "down_proj": act(x W_gate[e]ᵀ) * (x W_up[e]ᵀ)}`` (T, I)."""
        gate, up = F.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
        return {"gate_up_proj": x, "down_proj": module.act_fn(gate) * up}


# Qwen3-MoE, Qwen3.5-MoE, Mixtral, OLMoE, Granite-MoE, DeepSeek-V3, GLM-4-MoE: forward is
# act(x W_gate[e]ᵀ) * (x W_up[e]ᵀ) then W_down[e], with gate_up = [W_gate; W_up] row-stacked
GATE_UP_DOWN = ExpertsLayout((("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))))


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` holds fused MoE experts: a class named ``*Experts`` with 3-D parameters (whether or
    not :func:`experts_layout` knows its layout)."""
    return type(module).__name__.endswith("Experts") and any(
        p.ndim == 3 for p in module.parameters(recurse=False))


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The :class:`ExpertsLayout` of a fused-experts module, or None (not experts, or a layout we do not know).

    Known: :data:`GATE_UP_DOWN` (no biases, ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)).
    gpt-oss stores its experts transposed, with biases: not known yet.
    """
    if not is_experts_module(module):
        return None
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if set(params) != {"gate_up_proj", "down_proj"} or gate_up.ndim != 3 or down.ndim != 3:
        return None
    e, two_i, h = gate_up.shape
    if down.shape != (e, h, two_i // 2) or two_i % 2:
        return None
    return GATE_UP_DOWN


# the router beside the fused experts of every MoE block transformers 5 has (Qwen3-MoE, Mixtral, OLMoE, GLM-4-MoE,
# DeepSeek-V3): a sibling module with a (E, H) weight
ROUTER_NAME = "gate"
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # config / module attributes holding E
ROUTER_EXPERT_BUFFERS = ("e_score_correction_bias",)  # (E,) router buffers (DeepSeek-V3, GLM-4-MoE)
ROUTER_GROUP_KEYS = ("num_group", "n_group")  # group-limited routing (DeepSeek-V3): experts come in groups


def moe_parts(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, nn.Module]]:
    """``(experts module name, router, experts)`` of every fused-experts module under ``root`` (a model or a
    block) of a known layout whose parent holds a router :data:`ROUTER_NAME` with a (E, H) weight."""
    out = []
    modules = dict(root.named_modules())
    for name, module in modules.items():
        if experts_layout(module) is None:
            continue
        router = getattr(modules[name.rpartition(".")[0]], ROUTER_NAME, None)
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[0] == module.gate_up_proj.shape[0]:
            out.append((f"{prefix}.{name}" if prefix else name, router, module))
    return out


def set_expert_count(config: Any, n_experts: int) -> dict[str, int]:
    """Write the number of routed experts into a Hugging Face config (every key of :data:`EXPERT_COUNT_KEYS` it
    has), in place. Returns ``{key: new value}`` for the keys whose value changed."""
    changed = {}
    for key in EXPERT_COUNT_KEYS:
        if getattr(config, key, None) is not None:
            if getattr(config, key) != n_experts:
                changed[key] = n_experts
            setattr(config, key, n_experts)
    return changed


@dataclass(frozen=True)
class ExpertCheckpointNames:
    """How a family's checkpoints (and vLLM) name per-expert linears: ``{experts}.{e}.{name}.weight``.

    Attributes:
        names: per-expert linear (``gate_proj``, ``up_proj``, ``down_proj``) -> its checkpoint name.
        renames: ``(in the model, in the checkpoint)`` substrings of every tensor name that differ
            (Mixtral's ``.mlp.`` is ``.block_sparse_moe.`` in its checkpoints).
        fused: the checkpoints keep the experts fused (Granite-MoE's ``input_linear``): no per-expert names.
    """

    names: tuple[tuple[str, str], ...] = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))
    renames: tuple[tuple[str, str], ...] = ()
    fused: bool = False

    def name(self, linear: str) -> str:
        return dict(self.names)[linear]

    def to_checkpoint(self, key: str) -> str:
        for ours, theirs in self.renames:
            key = key.replace(ours, theirs)
        return key

    def from_checkpoint(self, key: str) -> str:
        for ours, theirs in self.renames:
            key = key.replace(theirs, ours)
        return key


# model_type -> checkpoint names, read from transformers' conversion_mapping.py (5.25) and vLLM's model files;
# families not listed use gate_proj / up_proj / down_proj with no renames (Qwen2/3-MoE, OLMoE, DeepSeek-V2/3,
# GLM-4-MoE)
EXPERT_CHECKPOINT_NAMES: dict[str, ExpertCheckpointNames] = {
    "mixtral": ExpertCheckpointNames(names=(("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")),
                                     renames=((".mlp.", ".block_sparse_moe."),)),
    "minimax": ExpertCheckpointNames(names=(("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")),
                                     renames=((".mlp.", ".block_sparse_moe."),)),
    "granitemoe": ExpertCheckpointNames(fused=True),
    "granitemoeshared": ExpertCheckpointNames(fused=True),
    "granitemoehybrid": ExpertCheckpointNames(fused=True),
}


def expert_checkpoint_names(config: Any) -> ExpertCheckpointNames:
    """:class:`ExpertCheckpointNames` of a model config's family."""
    return EXPERT_CHECKPOINT_NAMES.get(getattr(config, "model_type", None), ExpertCheckpointNames())


# ---------------------------------------------------------------- what each parameter is

PARAM_KINDS = ("attention", "dense MLP", "experts", "router", "embeddings", "lm_head", "other")


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """``{parameter name: kind}`` for every parameter of ``model``, kinds from :data:`PARAM_KINDS`.

    * ``embeddings``: the input embedding and any other lookup table (``nn.Embedding``, e.g.
      Gemma 4's per-layer embeddings); ``lm_head``: the output embedding (a tied weight counts
      once, as the embedding);
    * ``experts``: parameters of a fused-experts module (class name ending in ``Experts``,
      as transformers 5 lays out Qwen3-MoE, Mixtral, DeepSeek-V3, gpt-oss...) or any 3-D weight;
    * ``router``: a module whose class name holds ``Router`` / ``TopK`` / ``Gate`` (but not
      ``GateUp``), or a linear named ``gate`` / ``router`` that sits beside fused experts;
    * ``attention``: inside an attention module (:func:`attention_modules`, or a path through
      ``attn`` / ``attention``); ``dense MLP``: inside ``mlp`` / ``feed_forward`` / ``ffn``;
    * ``other``: the rest (norms outside those modules, convolutions of non-decoders...).
    """
    modules = dict(model.named_modules())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    attention = {name for name, _ in attention_modules(model)}
    experts = {name for name, m in modules.items() if type(m).__name__.endswith("Experts")}
    kinds = {}
    for full, param in model.named_parameters():  # shared (tied) parameters are listed once
        owner_name = full.rpartition(".")[0]
        owner = modules.get(owner_name)
        parts = owner_name.split(".")
        cls = type(owner).__name__
        beside_experts = any(f"{owner_name.rpartition('.')[0]}.{e.rpartition('.')[2]}" in experts for e in experts)
        if owner is not None and owner is head and owner is not emb:
            kind = "lm_head"
        elif owner is not None and (owner is emb or isinstance(owner, nn.Embedding)):
            kind = "embeddings"
        elif param.ndim == 3 or any(owner_name == e or owner_name.startswith(e + ".") for e in experts):
            kind = "experts"
        elif (any(k in cls for k in ("Router", "TopK")) or (cls.endswith("Gate") and "GateUp" not in cls)
              or (parts[-1] in ("gate", "router") and beside_experts)):
            kind = "router"
        elif any(owner_name == a or owner_name.startswith(a + ".") for a in attention) or any(
                ("attn" in p or "attention" in p) and "norm" not in p for p in parts):
            kind = "attention"
        elif any(p in ("mlp", "feed_forward", "ffn", "block_sparse_moe") or p.startswith("mlp") for p in parts):
            kind = "dense MLP"
        else:
            kind = "other"
        kinds[full] = kind
    return kinds


# ---------------------------------------------------------------- attention dispatch

WRAPPABLE_ATTENTION = ("sdpa", "eager")  # implementations our attention wrappers call through (flash/flex: untested)


def attention_modules(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the attention modules under ``root`` that dispatch through ``AttentionInterface``.

    An attention module is the innermost module whose class name ends in
    ``Attention``, that holds a ``config`` with ``_attn_implementation`` and
    whose defining file uses transformers' ``ALL_ATTENTION_FUNCTIONS`` (every
    modern transformers decoder: Llama, Mistral, Qwen2/3, Gemma, Phi-3...).
    """
    hits = []
    for name, m in root.named_modules():
        if not type(m).__name__.endswith("Attention") or not hasattr(getattr(m, "config", None), "_attn_implementation"):
            continue
        if getattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS", None) is None:
            continue
        hits.append((f"{prefix}.{name}" if prefix and name else (prefix or name), m))
    # BertAttention holds BertSelfAttention: keep the one that calls the attention function
    return [(n, m) for n, m in hits if not any(o.startswith(n + ".") for o, _ in hits)]


def eager_attention(module: nn.Module) -> Callable:
    """The model family's own ``eager_attention_forward`` (it lives in the model's file, not in the registry).

    Raises:
        ValueError: the module's file defines none.
    """
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its module: load the model "
                         "with attn_implementation='sdpa'")
    return fn


def base_attention(attention: nn.Module, what: str, wrapper_prefix: str) -> str:
    """The attention implementation ``attention`` runs underneath any of our wrappers (``sdpa`` or ``eager``).

    Args:
        what: the feature that needs it, for the error message.
        wrapper_prefix: the prefix of our registered wrappers' names (``"<prefix><base>"``).

    Raises:
        ValueError: no ``config._attn_implementation``, or an implementation other than sdpa / eager.
    """
    config = getattr(attention, "config", None)
    if not hasattr(config, "_attn_implementation"):
        raise ValueError(f"{type(attention).__name__} has no config._attn_implementation: {what} needs a "
                         "transformers attention module")
    impl = config._attn_implementation or "eager"
    base = impl[len(wrapper_prefix):] if impl.startswith(wrapper_prefix) else impl
    if base not in WRAPPABLE_ATTENTION:
        raise ValueError(f"cannot {what} with attn_implementation={base!r}: load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    if base == "eager":
        eager_attention(attention)
    return base


def attention_function(base: str) -> Callable | None:
    """transformers' registered attention function for ``base`` (None for ``eager``: each family has its own)."""
    from transformers.modeling_utils import AttentionInterface

    return None if base == "eager" else AttentionInterface._global_mapping[base]


def register_attention(name: str, fn: Callable, mask_like: str) -> None:
    """Register ``fn`` with transformers' ``AttentionInterface`` as ``name``, with ``mask_like``'s mask function.

    Idempotent: a name already registered is left as it is.
    """
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if name in AttentionInterface._global_mapping:
        return
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[mask_like])


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation ``model.config`` selects (``"eager"`` when unset)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Select attention implementation ``name`` in ``model.config`` (every layer reads it from there)."""
    model.config._attn_implementation = name


def set_attention(attention: nn.Module, name: str) -> None:
    """Point ``attention.config._attn_implementation`` (shared by every layer of the model) at ``name``."""
    config = attention.config
    impl = config._attn_implementation
    if impl != name:
        config._attn_implementation = name
        log.info("attention implementation %s -> %s", impl, name)
