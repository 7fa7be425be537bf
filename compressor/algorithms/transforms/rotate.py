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

import torch
from torch import nn

from compressor.algorithms.transforms.fusion import (
    fold_norm,
    fresh_decoder,
    r3_targets,
    random_orthogonal,
    rotation_matrix,
    submodule,
    untie_embeddings,
    write_param,
)
from compressor.core.arch import LAYOUT_FEATURES, DecoderLayout, head_counts
from compressor.runtime.activations import QKRotation, attach_qk_rotation, qk_rotations
from compressor.runtime.online import OnlineHadamard, attach_input_transform, online_transforms

__all__ = ["random_orthogonal", "rotate_model"]

log = logging.getLogger(__name__)


SUPPORTS = frozenset(LAYOUT_FEATURES)  # every layout feature: Gemma's norms, Phi-3's fused linears, MoE blocks


def rotate_model(
    model: nn.Module, *, seed: int = 0, r1: str = "hadamard", r2: bool = True, r3: bool = False, r4: bool = True,
    online_o: bool = False, r1_at: str = "auto",
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
        r4: online Hadamard on the down_proj input (fused + run-time module). MoE
            experts have no run-time hook: their down projections are left out, with a warning.
        online_o: online Hadamard on the o_proj input (fused + run-time module),
            mixing the heads; exported in ``transform_config`` like R4.
        r1_at: where R1 goes. ``"residual"``: the residual stream, fused into the
            embedding, every reader and writer and ``lm_head`` (QuaRot's R1; ``r1``
            chooses the matrix). ``"inputs"``: an online Hadamard on the inputs of
            the readers of each normalized stream (q/k/v and gate/up, fused W ← W H),
            residual, embedding and ``lm_head`` untouched; the only exact choice for
            families with norms after attention and MLP (Gemma 2/3's sandwich norms
            scale the writers' output per channel, which no residual rotation
            commutes with; SpinQuant's authors suggest the same, facebookresearch/SpinQuant#22).
            ``"auto"``: ``"inputs"`` for those families, ``"residual"`` otherwise.

    Returns:
        What was applied: ``{"r1", "r1_at", "hidden_size", "r2", "r3", "r4", "online_o", "seed",
        "untied_embeddings", "folded_norms", "online", "r4_skipped_experts"}`` (r2 / r3 / r4 / online_o are
        the rotation sizes, or None when off; ``online`` counts the run-time rotations, linear inputs
        and attention modules together; ``r4_skipped_experts`` counts MoE blocks whose experts R4 left out).

    Raises:
        ValueError: unsupported architecture, size or attention
            implementation, or a model that is already rotated or quantized.
    """
    if r1 not in ("hadamard", "random"):
        raise ValueError(f"r1={r1!r}: use 'hadamard' (randomized Hadamard) or 'random' (random orthogonal)")
    if r1_at not in ("auto", "residual", "inputs"):
        raise ValueError(f"r1_at={r1_at!r}: use 'auto', 'residual' or 'inputs'")
    layout, blocks_name, blocks, emb, head = fresh_decoder(model, "rotate", SUPPORTS)
    config = model.config
    hidden = config.hidden_size
    n_heads, n_kv, head_dim = head_counts(config)
    if r1_at == "auto":
        r1_at = "inputs" if layout.post_norms else "residual"
    if r1_at == "residual" and layout.post_norms:
        raise ValueError(f"rotate: {config.model_type} has norms on the attention and MLP outputs "
                         f"({', '.join(layout.post_norms)}) whose per-channel weights do not commute with a rotation "
                         "of the residual stream; use r1_at: inputs (or auto), which rotates each reader's input online")
    if r1_at == "inputs" and r1 != "hadamard":
        raise ValueError(f"rotate: r1={r1!r} needs r1_at: residual; rotations at the readers' inputs run online, "
                         "as Hadamard transforms (r1: hadamard)")
    moe = [i for i, b in enumerate(blocks) if layout.moe_parts(b) is not None]
    if r1_at == "inputs" and moe:
        raise ValueError(f"rotate: r1_at=inputs has no run-time hook inside MoE blocks ({blocks_name}.{moe[0]}); "
                         "use r1_at: residual (or auto)")
    # sizes are checked before any weight changes, so an unsupported size leaves the model intact
    q1 = rotation_matrix(r1, hidden, seed) if r1_at == "residual" else OnlineHadamard(hidden).matrix(torch.float64)
    q2 = rotation_matrix(r1, head_dim, seed + 1) if r2 else None  # (hd, hd)
    dense = [i for i in range(len(blocks)) if i not in set(moe)]
    inter_sizes = {submodule(blocks[i], layout.down, f"{blocks_name}.{i}").in_features for i in dense}
    o_sizes = {submodule(b, layout.o, f"{blocks_name}.{i}").in_features for i, b in enumerate(blocks)}
    q4 = {n: OnlineHadamard(n).matrix(torch.float64) for n in inter_sizes} if r4 else {}  # (n, n) each
    qo = {n: OnlineHadamard(n).matrix(torch.float64) for n in o_sizes} if online_o else {}  # (n, n) each
    attention = r3_targets(model, head_dim) if r3 else []
    untied = untie_embeddings(model, emb, head) if r1_at == "residual" else False

    with torch.no_grad():
        folded = 0
        for i, block in enumerate(blocks):
            where = f"{blocks_name}.{i}"
            parts = layout.moe_parts(block)
            m = layout.modules(block, where, DecoderLayout.ATTENTION if parts else DecoderLayout.BLOCK)
            mlp_readers = [parts[0], parts[1].gate_up_proj] if parts else [m["gate"], m["up"]]
            fold_norm(m["attn_norm"], [m["q"], m["k"], m["v"]], f"{where}.{layout.attn_norm}", layout.norm_offset)
            fold_norm(m["mlp_norm"], mlp_readers, f"{where}.{layout.mlp_norm}", layout.norm_offset)
            folded += 2
            _rotate_block(m, parts, layout, q1, r1_at, q2, q4, n_heads, n_kv, head_dim, where, qo)
        if r1_at == "residual":
            fold_norm(submodule(model, layout.final_norm, type(model).__name__), [head], layout.final_norm,
                      layout.norm_offset)
            folded += 1
            dev = emb.weight.device
            write_param(emb.weight, emb.weight.detach().double() @ q1.to(dev))  # (V, d) @ (d, d)
            write_param(head.weight, head.weight.detach().double() @ q1.to(head.weight.device))
    for attn in attention:  # R3: nothing to fuse, q kᵀ is invariant
        dev = next(attn.parameters(), emb.weight).device
        attach_qk_rotation(attn, QKRotation(head_dim).to(dev))
    if r4 and moe:
        log.warning("rotate: r4 left out the experts' down projections of %d MoE blocks (no run-time hook inside "
                    "fused experts); R1 and R2 cover them", len(moe))

    info = {
        "r1": r1 if r1_at == "residual" else "hadamard", "r1_at": r1_at, "hidden_size": hidden,
        "r2": head_dim if r2 else None, "r3": head_dim if r3 else None,
        "r4": (_sizes(inter_sizes) if inter_sizes else None) if r4 else None,
        "online_o": _sizes(o_sizes) if online_o else None,
        "seed": seed, "untied_embeddings": untied, "folded_norms": folded,
        "online": len(online_transforms(model)) + len(qk_rotations(model)),
        "r4_skipped_experts": len(moe) if r4 else 0,
    }
    model.rotation_info = info
    log.info("rotate: %s", info)
    return info


def _sizes(sizes: set[int]) -> int | list[int]:
    """One size, or the sorted sizes when blocks differ."""
    return next(iter(sizes)) if len(sizes) == 1 else sorted(sizes)


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` without repeats (a fused qkv_proj stands for q, k and v), order kept."""
    out: list[nn.Module] = []
    for mod in modules:
        if all(mod is not seen for seen in out):
            out.append(mod)
    return out


def _rotate_block(m: dict[str, nn.Module], parts: tuple[nn.Module, nn.Module] | None, layout: DecoderLayout,
                  q1: torch.Tensor, r1_at: str, q2: torch.Tensor | None, q4: dict[int, torch.Tensor],
                  n_heads: int, n_kv: int, head_dim: int, where: str,
                  qo: dict[int, torch.Tensor] | None = None) -> None:
    """R1 on the block's readers (and writers, on the residual), R2 on v/o heads, R4 on down_proj, the online
    o_proj Hadamard (``qo``) on o_proj (weights already norm-folded). ``parts`` is ``(router, experts)`` of an
    MoE block, else None."""
    dev = m["q"].weight.device
    q1 = q1.to(dev)
    readers = _unique([m["q"], m["k"], m["v"]] + ([parts[0]] if parts else [m["gate"], m["up"]]))
    for lin in readers:  # readers: y = x W_newᵀ with x = h Q → W_new = W Q
        write_param(lin.weight, lin.weight.detach().double() @ q1)
        if r1_at == "inputs":  # x ← x Q at run time (Q is the online Hadamard's matrix)
            attach_input_transform(lin, OnlineHadamard(q1.shape[0]).to(dev))
    if r1_at == "residual":
        writers = [m["o"]] if parts else [m["o"], m["down"]]
        for lin in writers:  # writers: out Q = a (Qᵀ W)ᵀ → W_new = Qᵀ W, b_new = b Q
            write_param(lin.weight, q1.T @ lin.weight.detach().double())
            if lin.bias is not None:
                write_param(lin.bias, lin.bias.detach().double() @ q1)
    if parts:  # experts (E, 2I, H) read and (E, H, I) write the residual; one expert at a time
        experts = parts[1]
        for e in range(experts.gate_up_proj.shape[0]):
            write_param(experts.gate_up_proj[e], experts.gate_up_proj[e].detach().double() @ q1)
            write_param(experts.down_proj[e], q1.T @ experts.down_proj[e].detach().double())
    if q2 is not None:
        v, o = m["v"], m["o"]
        rows = layout.v_rows(n_heads, n_kv, head_dim)
        if v.out_features < rows.stop or (not layout.fused_qkv and v.out_features != rows.stop) \
                or o.in_features != n_heads * head_dim:
            raise ValueError(f"rotate: {where} v_proj/o_proj widths ({v.out_features}, {o.in_features}) do not match "
                             f"{n_kv} kv heads / {n_heads} heads of {head_dim}; set r2=false")
        q2 = q2.to(dev)
        wv = v.weight.detach()[rows].double().reshape(n_kv, head_dim, -1)  # (kv, hd, d)
        write_param(v.weight[rows], (q2.T @ wv).reshape(-1, wv.shape[-1]))  # v_h ← v_h R2
        if v.bias is not None:
            write_param(v.bias[rows], (v.bias.detach()[rows].double().reshape(n_kv, head_dim) @ q2).reshape(-1))
        wo = o.weight.detach().double().reshape(o.out_features, n_heads, head_dim)  # (d, H, hd)
        write_param(o.weight, (wo @ q2).reshape(o.weight.shape))  # W_o,h ← W_o,h R2 undoes it
    for key, online in (("down", q4 if not parts else {}), ("o", qo)):
        if online:
            lin = m[key]
            write_param(lin.weight, lin.weight.detach().double() @ online[lin.in_features].to(dev))  # W ← W Q; x ← x Q
            attach_input_transform(lin, OnlineHadamard(lin.in_features).to(dev))
