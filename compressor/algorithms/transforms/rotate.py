"""Equivalent rotations of a Hugging Face decoder LM (QuaRot, arXiv 2404.00456; SpinQuant, arXiv 2405.16406).

Every step leaves the full-precision function unchanged:

1. **Fold RMSNorm weights** into the linears that read the normalized stream
   (``input_layernorm`` → q/k/v, ``post_attention_layernorm`` → gate/up, final
   norm → ``lm_head``): ``W ← W diag(g)``, ``g ← 1``. Tied embeddings are untied
   first, since the embedding and ``lm_head`` then differ.
2. **R1**, a global orthogonal Q (d, d) on the residual stream (QuaRot §4,
   SpinQuant eq. 1): ``W_emb ← W_emb Q``; readers (q/k/v, gate/up, lm_head)
   ``W ← W Q``; writers (o_proj, down_proj) ``W ← Qᵀ W``, ``b ← b Q``.
   RMSNorm(h Q) = RMSNorm(h) Q holds once the norm weight is 1 (rms is
   invariant under orthogonal Q; a LayerNorm's mean subtraction would not be).
3. **R2**, one orthogonal (head_dim, head_dim) shared by every head, on the
   output of v_proj (``W_v,h ← R2ᵀ W_v,h``) and the input of o_proj
   (``W_o,h ← W_o,h R2``). Attention mixes value rows linearly, so each head's
   output is rotated by R2 and o_proj undoes it; sharing R2 makes GQA exact.
4. **R3** (optional, off by default), an online Hadamard Q (head_dim, head_dim)
   on every query and key head *after* RoPE: ``q ← q Q``, ``k ← k Q`` at run
   time (QuaRot §4). Scores ``q kᵀ`` are unchanged, no weight changes, and the
   keys a quantized KV cache holds are rotated. It lives in the attention
   function of :mod:`compressor.runtime.activations` (``qk_rotation`` child of
   each attention module), which applies it before a KV quantizer.
5. **R4**, an online Hadamard before down_proj: ``W_down ← W_down Q`` fused,
   and ``x ← x Q`` at run time (:mod:`compressor.runtime.online`).
6. **Online o_proj Hadamard** (optional, off by default): the same on the
   o_proj input, a full Hadamard of width heads × head_dim. R2 only rotates
   within a head; this one also mixes the heads, as QuaRot's online Hadamard
   before the output projection does (QuaRot §4 applies H_heads online and
   H_head_dim fused; one full Hadamard on top of R2 spreads every channel
   over the whole input). It matters when the o_proj input is quantized (A4).

Weights are rotated in float64 and cast back to their dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compressor.core.arch import find_blocks, layout_for
from compressor.runtime.activations import (
    QKRotation, _wrapped_attention, attach_qk_rotation, attention_modules, qk_rotations,
)
from compressor.core.state import is_quantized
from compressor.recipe import Pass, PassConfig, register_pass
from compressor.core.hadamard import random_hadamard
from compressor.runtime.online import OnlineHadamard, attach_input_transform, online_transforms

__all__ = ["random_orthogonal", "rotate_model", "RotateConfig", "RotatePass"]

log = logging.getLogger(__name__)


def random_orthogonal(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix: QR of a seeded Gaussian, signs fixed by diag(R) (SpinQuant's random init)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def _rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    """(n, n) float64 orthogonal matrix of the given kind."""
    if kind == "hadamard":
        return random_hadamard(n, seed=seed)
    return random_orthogonal(n, seed=seed)


def _get(root: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(f"rotate: {where} has no module {path!r}; the architecture does not match its layout") from None


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a float64 result into a parameter, keeping its dtype and device."""
    param.data.copy_(value.to(param.dtype))


def _fold_norm(norm: nn.Module, linears: list[nn.Linear], name: str) -> None:
    """RMSNorm weight g into the following linears: W ← W diag(g); g ← 1."""
    g = getattr(norm, "weight", None)
    if not isinstance(g, torch.Tensor) or g.ndim != 1 or getattr(norm, "bias", None) is not None:
        raise ValueError(f"rotate: {name} ({type(norm).__name__}) is not an RMSNorm with a (d,) weight and no bias; "
                         "only RMSNorm decoders can be rotated exactly")
    g64 = g.detach().double()
    for lin in linears:
        _write(lin.weight, lin.weight.detach().double() * g64.to(lin.weight.device)[None, :])
    g.data.fill_(1.0)


def _untie(model: nn.Module, emb: nn.Module, head: nn.Module) -> bool:
    """Give lm_head its own copy of a tied embedding weight; True when it was tied."""
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False  # keep save_pretrained / tie_weights from re-tying them
    return True


def _heads(config) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) from a HF config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def rotate_model(
    model: nn.Module, *, seed: int = 0, r1: str = "hadamard", r2: bool = True, r3: bool = False, r4: bool = True,
    online_o: bool = False,
) -> dict:
    """Fold norms and apply R1 / R2 / R3 / R4 to a decoder LM in place; the fp function is unchanged.

    Args:
        model: a Hugging Face causal LM of a family in :data:`compressor.core.arch.LAYOUTS`, not
            yet quantized or rotated; any float dtype (math runs in float64).
        seed: seeds the random signs (``"hadamard"``) or the Gaussian (``"random"``).
        r1: ``"hadamard"`` (randomized Hadamard, QuaRot) or ``"random"``
            (random orthogonal, SpinQuant's initialization) for R1 and R2.
        r2: rotate each value head / o_proj input head (fused).
        r3: online Hadamard on queries and keys after RoPE (run-time only; the
            model must use ``sdpa`` or ``eager`` attention). Off by default: it
            only matters when the KV cache is quantized, and plain transformers ignores it
            in an export (``load_compressed`` reattaches it).
        r4: online Hadamard on the down_proj input (fused + run-time module).
        online_o: online Hadamard on the o_proj input (fused + run-time module),
            mixing the heads; exported in ``transform_config`` like R4.

    Returns:
        What was applied: ``{"r1", "hidden_size", "r2", "r3", "r4", "online_o", "seed",
        "untied_embeddings", "folded_norms", "online"}`` (r2 / r3 / r4 / online_o are the
        rotation sizes, or None when off; ``online`` counts the run-time
        rotations, linear inputs and attention modules together).

    Raises:
        ValueError: unsupported architecture, size or attention
            implementation, or a model that is already rotated or quantized.
    """
    if r1 not in ("hadamard", "random"):
        raise ValueError(f"r1={r1!r}: use 'hadamard' (randomized Hadamard) or 'random' (random orthogonal)")
    layout, blocks_name, blocks, emb, head = _fresh_decoder(model, "rotate")
    config = model.config
    hidden = config.hidden_size
    n_heads, n_kv, head_dim = _heads(config)
    # sizes are checked before any weight changes, so an unsupported size leaves the model intact
    q1 = _rotation(r1, hidden, seed)  # (d, d) float64
    q2 = _rotation(r1, head_dim, seed + 1) if r2 else None  # (hd, hd)
    inter_sizes = {_get(b, layout.down, f"{blocks_name}.{i}").in_features for i, b in enumerate(blocks)}
    o_sizes = {_get(b, layout.o, f"{blocks_name}.{i}").in_features for i, b in enumerate(blocks)}
    q4 = {n: OnlineHadamard(n).matrix(torch.float64) for n in inter_sizes} if r4 else {}  # (n, n) each
    qo = {n: OnlineHadamard(n).matrix(torch.float64) for n in o_sizes} if online_o else {}  # (n, n) each
    attention = _r3_targets(model, head_dim) if r3 else []
    untied = _untie(model, emb, head)

    with torch.no_grad():
        folded = 0
        for i, block in enumerate(blocks):
            where = f"{blocks_name}.{i}"
            m = {k: _get(block, getattr(layout, k), where) for k in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")}
            _fold_norm(m["attn_norm"], [m["q"], m["k"], m["v"]], f"{where}.{layout.attn_norm}")
            _fold_norm(m["mlp_norm"], [m["gate"], m["up"]], f"{where}.{layout.mlp_norm}")
            folded += 2
            _rotate_block(m, q1, q2, q4, n_heads, n_kv, head_dim, where, qo)
        _fold_norm(_get(model, layout.final_norm, type(model).__name__), [head], layout.final_norm)
        folded += 1
        dev = emb.weight.device
        _write(emb.weight, emb.weight.detach().double() @ q1.to(dev))  # (V, d) @ (d, d)
        _write(head.weight, head.weight.detach().double() @ q1.to(head.weight.device))
    for attn in attention:  # R3: nothing to fuse, q kᵀ is invariant
        dev = next(attn.parameters(), emb.weight).device
        attach_qk_rotation(attn, QKRotation(head_dim).to(dev))

    info = {
        "r1": r1, "hidden_size": hidden, "r2": head_dim if r2 else None, "r3": head_dim if r3 else None,
        "r4": _sizes(inter_sizes) if r4 else None, "online_o": _sizes(o_sizes) if online_o else None,
        "seed": seed, "untied_embeddings": untied, "folded_norms": folded,
        "online": len(online_transforms(model)) + len(qk_rotations(model)),
    }
    model.rotation_info = info
    log.info("rotate: %s", info)
    return info


def _sizes(sizes: set[int]) -> int | list[int]:
    """One size, or the sorted sizes when blocks differ."""
    return next(iter(sizes)) if len(sizes) == 1 else sorted(sizes)


def _fresh_decoder(model: nn.Module, who: str) -> tuple:
    """``(layout, blocks_name, blocks, embedding, lm_head)`` of a model neither rotated nor quantized.

    Raises:
        ValueError: an unsupported family, a model already rotated or
            quantized, or no nn.Embedding input / nn.Linear lm_head.
    """
    layout = layout_for(model)
    if getattr(model, "rotation_info", None) is not None or online_transforms(model) or qk_rotations(model):
        raise ValueError(f"{who}: the model is already rotated; run rotate or ostquant once, on a freshly loaded model")
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise ValueError(f"{who}: {quantized[0]} is already quantized; put the {who} pass before quantization passes")
    blocks_name, blocks = find_blocks(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError(f"{who}: {type(model).__name__} needs an nn.Embedding input and an nn.Linear lm_head")
    return layout, blocks_name, blocks, emb, head


def _r3_targets(model: nn.Module, head_dim: int) -> list[nn.Module]:
    """The attention modules R3 attaches to, checked before any weight changes.

    Raises:
        ValueError: no attention module dispatching through transformers'
            ``AttentionInterface``, an attention implementation other than
            sdpa / eager, a head_dim without a Hadamard construction, or a
            module whose head_dim differs from the config's.
    """
    found = attention_modules(model)
    if not found:
        raise ValueError(f"rotate: r3 needs transformers attention modules (dispatching through AttentionInterface), "
                         f"and {type(model).__name__} has none; set r3=false")
    OnlineHadamard(head_dim)  # raises for sizes without a Hadamard construction, listing the supported ones
    for name, attn in found:
        try:
            _wrapped_attention(attn, "rotate queries and keys (r3)")
        except ValueError as err:
            raise ValueError(f"rotate: {name}: {err}") from None
        size = getattr(attn, "head_dim", head_dim)
        if size != head_dim:
            raise ValueError(f"rotate: {name} has head_dim={size}, not the config's {head_dim}; set r3=false")
    return [attn for _, attn in found]


def _rotate_block(m: dict[str, nn.Module], q1: torch.Tensor, q2: torch.Tensor | None, q4: dict[int, torch.Tensor],
                  n_heads: int, n_kv: int, head_dim: int, where: str,
                  qo: dict[int, torch.Tensor] | None = None) -> None:
    """R1 on the block's readers and writers, R2 on v/o heads, R4 on down_proj, the online o_proj Hadamard
    (``qo``) on o_proj (weights already norm-folded)."""
    dev = m["q"].weight.device
    q1 = q1.to(dev)
    for key in ("q", "k", "v", "gate", "up"):  # readers: y = x W_newᵀ with x = h Q → W_new = W Q
        lin = m[key]
        _write(lin.weight, lin.weight.detach().double() @ q1)
    for key in ("o", "down"):  # writers: out Q = a (Qᵀ W)ᵀ → W_new = Qᵀ W, b_new = b Q
        lin = m[key]
        _write(lin.weight, q1.T @ lin.weight.detach().double())
        if lin.bias is not None:
            _write(lin.bias, lin.bias.detach().double() @ q1)
    if q2 is not None:
        v, o = m["v"], m["o"]
        if v.out_features != n_kv * head_dim or o.in_features != n_heads * head_dim:
            raise ValueError(f"rotate: {where} v_proj/o_proj widths ({v.out_features}, {o.in_features}) do not match "
                             f"{n_kv} kv heads / {n_heads} heads of {head_dim}; set r2=false")
        q2 = q2.to(dev)
        wv = v.weight.detach().double().reshape(n_kv, head_dim, -1)  # (kv, hd, d)
        _write(v.weight, (q2.T @ wv).reshape(v.weight.shape))  # v_h ← v_h R2
        if v.bias is not None:
            _write(v.bias, (v.bias.detach().double().reshape(n_kv, head_dim) @ q2).reshape(-1))
        wo = o.weight.detach().double().reshape(o.out_features, n_heads, head_dim)  # (d, H, hd)
        _write(o.weight, (wo @ q2).reshape(o.weight.shape))  # W_o,h ← W_o,h R2 undoes it
    for key, online in (("down", q4), ("o", qo)):
        if online:
            lin = m[key]
            _write(lin.weight, lin.weight.detach().double() @ online[lin.in_features].to(dev))  # W ← W Q; x ← x Q
            attach_input_transform(lin, OnlineHadamard(lin.in_features).to(dev))


# ---------------------------------------------------------------- recipe pass


@dataclass(frozen=True, kw_only=True)
class RotateConfig(PassConfig):
    """Training-free equivalent rotations (norm folding, R1, R2, R3, R4).

    The rotation covers the whole model, so ``targets``/``ignore`` do not apply
    and are not part of the recipe.

    Attributes:
        seed: seed of the random signs / Gaussian.
        r1: ``"hadamard"`` or ``"random"``.
        r2: per-head rotation of values / o_proj input.
        r3: online Hadamard on queries and keys after RoPE, for a quantized KV
            cache (default false: exact and useless without ``kv_bits``; exported in
            ``transform_config``, applied on reload by ``load_compressed``).
        r4: online Hadamard before down_proj (exported in ``transform_config``; only
            ``load_compressed`` and vLLM apply it).
        online_o: online Hadamard before o_proj, mixing the heads (QuaRot's; default
            false; exported like ``r4``). Use it when linear inputs are quantized to 4 bits.
    """

    targets: tuple[str, ...] = field(default=(), init=False)
    ignore: tuple[str, ...] = field(default=(), init=False)
    seed: int = 0
    r1: str = "hadamard"
    r2: bool = True
    r3: bool = False
    r4: bool = True
    online_o: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"rotate.seed must be a non-negative integer, got {self.seed!r}")
        if self.r1 not in ("hadamard", "random"):
            raise ValueError(f"rotate.r1={self.r1!r}: use 'hadamard' or 'random'")
        for name in ("r2", "r3", "r4", "online_o"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rotate.{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {"seed": self.seed, "r1": self.r1, "r2": self.r2, "r3": self.r3, "r4": self.r4,
                "online_o": self.online_o}


@register_pass
class RotatePass(Pass):
    """Rotate the whole model once, before the quantization passes (a model-level pass).

    ``compressor.compress`` runs model-level passes on the full model before
    the sequential block pipeline; they must lead the recipe.
    """

    name = "rotate"
    config_cls = RotateConfig
    model_level: ClassVar[bool] = True

    def apply(self, model: nn.Module, *, quiet: bool = False, **context) -> None:
        """Rotate ``model`` in place; what was applied is kept in ``self.applied``."""
        c = self.config
        self.applied = rotate_model(model, seed=c.seed, r1=c.r1, r2=c.r2, r3=c.r3, r4=c.r4, online_o=c.online_o)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        raise ValueError("rotate is a model-level pass: run the recipe through compressor.compress, which "
                         "rotates the whole model before the block pipeline")
