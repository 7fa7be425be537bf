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
from typing import Callable

import torch
from torch import nn

from compressor.algorithms.transforms.fusion import (
    ROW_CHUNK,
    fold_norm,
    fresh_decoder,
    r3_targets,
    random_orthogonal,
    rotation_matrix,
    rotation_operator,
    submodule,
    untie_embeddings,
    write_param,
    write_rows,
)
from compressor.core.arch import LAYOUT_FEATURES, DecoderLayout, head_counts
from compressor.runtime.activations import QKRotation, attach_qk_rotation, detach_qk_rotation, qk_rotations
from compressor.runtime.online import (
    TRANSFORM_CHILD,
    OnlineHadamard,
    attach_input_transform,
    detach_input_transform,
    online_transforms,
)

__all__ = ["random_orthogonal", "rotate_model", "Rotation", "block_hadamard_inputs"]

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
    rotation = Rotation(model, seed=seed, r1=r1, r2=r2, r3=r3, r4=r4, online_o=online_o, r1_at=r1_at)
    rotation.outside()
    for i in range(len(rotation.blocks)):
        rotation.block(i)
    return rotation.finish()


class Rotation:
    """One model's rotation (:func:`rotate_model`), checked and planned at construction, then applied in parts.

    :meth:`outside` rotates what lives outside the decoder blocks (untied head, final norm, embedding,
    ``lm_head``), :meth:`block` one decoder block (its norms folded, R1 / R2 / R4 / online o_proj fused, R3
    attached), in any order; :meth:`finish` records what was applied. :func:`rotate_model` runs them all at
    once; a streamed run (:mod:`compressor.export.stream`) rotates each block when it is read from the
    checkpoint, so no step needs more than one block in memory. Both give the same weights bit for bit.

    Args: as :func:`rotate_model`; the block sizes are read from the modules, so a model whose blocks'
    parameters are on ``meta`` can be planned.

    Raises:
        ValueError: as :func:`rotate_model`, before any weight changes.
    """

    def __init__(self, model: nn.Module, *, seed: int = 0, r1: str = "hadamard", r2: bool = True, r3: bool = False,
                 r4: bool = True, online_o: bool = False, r1_at: str = "auto"):
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
                             f"({', '.join(layout.post_norms)}) whose per-channel weights do not commute with a "
                             "rotation of the residual stream; use r1_at: inputs (or auto), which rotates each "
                             "reader's input online")
        if r1_at == "inputs" and r1 != "hadamard":
            raise ValueError(f"rotate: r1={r1!r} needs r1_at: residual; rotations at the readers' inputs run online, "
                             "as Hadamard transforms (r1: hadamard)")
        moe = [i for i, b in enumerate(blocks) if layout.moe_parts(b) is not None]
        if r1_at == "inputs" and moe:
            raise ValueError(f"rotate: r1_at=inputs has no run-time hook inside MoE blocks ({blocks_name}.{moe[0]}); "
                             "use r1_at: residual (or auto)")
        # sizes are checked before any weight changes, so an unsupported size leaves the model intact
        # R1 applied to rows: the fast transform (Hadamard) or a dense (d, d) matrix (random)
        self.q1 = rotation_operator(r1, hidden, seed) if r1_at == "residual" else OnlineHadamard(hidden)
        self.q2 = rotation_matrix(r1, head_dim, seed + 1) if r2 else None  # (hd, hd)
        dense = [i for i in range(len(blocks)) if i not in set(moe)]
        inter_sizes = {submodule(blocks[i], layout.down, f"{blocks_name}.{i}").in_features for i in dense}
        o_sizes = {submodule(b, layout.o, f"{blocks_name}.{i}").in_features for i, b in enumerate(blocks)}
        for n in (inter_sizes if r4 else set()) | (o_sizes if online_o else set()):
            OnlineHadamard(n)  # raises for sizes without a Hadamard construction, listing the supported ones
        attention = r3_targets(model, head_dim) if r3 else []
        self.model, self.layout, self.blocks_name, self.blocks = model, layout, blocks_name, blocks
        self.emb, self.head, self.r1_at, self.moe = emb, head, r1_at, set(moe)
        self.r4, self.online_o, self.heads = r4, online_o, (n_heads, n_kv, head_dim)
        self.attention = {id(a) for a in attention}
        self.rotated: set[int] = set()  # the block indices rotated so far (a streamed sweep reads a block twice)
        self.info = {  # what finish() returns; the three counts are filled in as the parts are applied
            "r1": r1 if r1_at == "residual" else "hadamard", "r1_at": r1_at, "hidden_size": hidden,
            "r2": head_dim if r2 else None, "r3": head_dim if r3 else None,
            "r4": (_sizes(inter_sizes) if inter_sizes else None) if r4 else None,
            "online_o": _sizes(o_sizes) if online_o else None,
            "seed": seed, "untied_embeddings": False, "folded_norms": 0, "online": 0,
            "r4_skipped_experts": len(moe) if r4 else 0,
        }

    def outside(self) -> None:
        """Untie and rotate the embedding and ``lm_head`` and fold the final norm into the head (R1 on the
        residual; nothing to do when R1 sits at the readers' inputs)."""
        if self.r1_at != "residual":
            return
        self.info["untied_embeddings"] = untie_embeddings(self.model, self.emb, self.head)
        with torch.no_grad():
            fold_norm(submodule(self.model, self.layout.final_norm, type(self.model).__name__), [self.head],
                      self.layout.final_norm, self.layout.norm_offset)
            self.info["folded_norms"] += 1
            rotate_rows(self.emb.weight, self.q1)  # (V, d) ← (V, d) Q
            rotate_rows(self.head.weight, self.q1)

    def block(self, index: int) -> None:
        """Rotate decoder block ``index`` (its parameters in memory) in place.

        A block rotated before and read again from the checkpoint since (a streamed run's allocation sweep
        reads each block once before the run reads it again) holds fresh weights but the earlier read's run-time
        transforms: those are dropped first, and the counts in :meth:`finish` count the block once.
        """
        block, where, layout = self.blocks[index], f"{self.blocks_name}.{index}", self.layout
        again = index in self.rotated
        if again:
            for m in block.modules():
                detach_input_transform(m)
                detach_qk_rotation(m)
        self.rotated.add(index)
        with torch.no_grad():
            parts = layout.moe_parts(block)
            m = layout.modules(block, where, DecoderLayout.ATTENTION if parts else DecoderLayout.BLOCK)
            mlp_readers = [parts[0], parts[1].gate_up_proj] if parts else [m["gate"], m["up"]]
            fold_norm(m["attn_norm"], [m["q"], m["k"], m["v"]], f"{where}.{layout.attn_norm}", layout.norm_offset)
            fold_norm(m["mlp_norm"], mlp_readers, f"{where}.{layout.mlp_norm}", layout.norm_offset)
            self.info["folded_norms"] += 0 if again else 2
            _rotate_block(m, parts, layout, self.q1, self.r1_at, self.q2, self.r4 and index not in self.moe,
                          *self.heads, where, self.online_o)
        for attn in block.modules():  # R3: nothing to fuse, q kᵀ is invariant
            if id(attn) in self.attention:
                dev = next(attn.parameters(), self.emb.weight).device
                attach_qk_rotation(attn, QKRotation(self.heads[2]).to(dev))

    def finish(self) -> dict:
        """What was applied (the dict :func:`rotate_model` returns), also kept as ``model.rotation_info``."""
        if self.info["r4_skipped_experts"]:
            log.warning("rotate: r4 left out the experts' down projections of %d MoE blocks (no run-time hook "
                        "inside fused experts); R1 and R2 cover them", len(self.moe))
        info = {**self.info, "online": len(online_transforms(self.model)) + len(qk_rotations(self.model))}
        self.model.rotation_info = info
        log.info("rotate: %s", info)
        return info


def rotate_rows(weight: torch.Tensor, q: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                chunk: int = ROW_CHUNK) -> None:
    """``weight ← weight @ Q`` in place, ``chunk`` rows at a time in float64 (:func:`~.fusion.write_rows`).

    Args:
        weight: (R, d) parameter (or a view of one), any float dtype, kept; a (128256, 4096) embedding needs
            0.27 GB beside it, not 4.2 GB.
        q: Q as a (d, d) float64 matrix, or a callable computing ``x ↦ x Q`` on (..., d) float64 rows (an
            :class:`~compressor.runtime.online.OnlineHadamard`, a :class:`~.fusion.FastRandomHadamard`: no
            (d, d) matrix is built or multiplied).
    """
    if isinstance(q, torch.Tensor):
        q = q.to(weight.device)
        write_rows(weight, lambda x: x @ q, chunk)
    else:
        write_rows(weight, q, chunk)


def rotate_columns(weight: torch.Tensor, q: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                   chunk: int = ROW_CHUNK) -> None:
    """``weight ← Qᵀ @ weight`` in place, ``chunk`` columns at a time in float64.

    Args:
        weight: (d, C) parameter, any float dtype, kept (a writer of the residual stream: o_proj, down_proj).
        q: (d, d) float64, or a callable computing ``x ↦ x Q`` on rows (each column c becomes ``(cᵀ Q)ᵀ``).
    """
    if isinstance(q, torch.Tensor):
        qt = q.T.to(weight.device)
        for start in range(0, weight.shape[1], chunk):
            cols = weight[:, start:start + chunk]
            write_param(cols, qt @ cols.detach().double())
    else:
        write_rows(weight.T, q, chunk)


def _width(q: torch.Tensor | OnlineHadamard) -> int:
    return q.shape[0] if isinstance(q, torch.Tensor) else q.size


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
                  q1: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], r1_at: str, q2: torch.Tensor | None, r4: bool,
                  n_heads: int, n_kv: int, head_dim: int, where: str, online_o: bool = False) -> None:
    """R1 on the block's readers (and writers, on the residual), R2 on v/o heads, R4 on down_proj (``r4``; never
    on an MoE block's experts), the online o_proj Hadamard (``online_o``) on o_proj (weights already
    norm-folded). ``parts`` is ``(router, experts)`` of an MoE block, else None."""
    dev = m["q"].weight.device
    readers = _unique([m["q"], m["k"], m["v"]] + ([parts[0]] if parts else [m["gate"], m["up"]]))
    for lin in readers:  # readers: y = x W_newᵀ with x = h Q → W_new = W Q
        rotate_rows(lin.weight, q1)
        if r1_at == "inputs":  # x ← x Q at run time (Q is the online Hadamard's matrix)
            attach_input_transform(lin, OnlineHadamard(_width(q1)).to(dev))
    if r1_at == "residual":
        writers = [m["o"]] if parts else [m["o"], m["down"]]
        for lin in writers:  # writers: out Q = a (Qᵀ W)ᵀ → W_new = Qᵀ W, b_new = b Q
            rotate_columns(lin.weight, q1)
            if lin.bias is not None:
                rotate_rows(lin.bias.view(1, -1), q1)  # b ← b Q, one row
    if parts:  # experts (E, 2I, H) read and (E, H, I) write the residual; one expert at a time
        experts = parts[1]
        for e in range(experts.gate_up_proj.shape[0]):
            rotate_rows(experts.gate_up_proj[e], q1)
            rotate_columns(experts.down_proj[e], q1)
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
    for key, on in (("down", r4 and not parts), ("o", online_o)):
        if on:  # W ← W Q row by row through the run-time transform itself (x Q = forward(x)), then x ← x Q online
            lin = m[key]
            hadamard = OnlineHadamard(lin.in_features).to(dev)
            rotate_rows(lin.weight, hadamard)
            attach_input_transform(lin, hadamard)


def block_hadamard_inputs(linears: list[tuple[str, nn.Linear]], block: int) -> int:
    """Rotate each linear's input block-wise, in place: ``x ← x Q``, ``W ← W Q`` with Q block-diagonal, one
    normalized Hadamard of size ``block`` per ``block`` inputs (MR-GPTQ's block rotations, arXiv 2509.23202: with
    ``block`` the input quantizer's group, each group's values are spread within the group, which its one scale
    then fits better). The fp function is unchanged; the run-time part is an
    :class:`~compressor.runtime.online.OnlineHadamard` with ``block`` as the linear's ``input_transform``.

    Args:
        linears: ``(name, module)`` of ``nn.Linear`` layers, not quantized, without an online transform; every
            ``in_features`` a multiple of ``block``.
        block: the Hadamard size, ``2^a * m`` (:func:`compressor.core.hadamard.hadamard_factors`).

    Returns:
        how many linears were rotated.

    Raises:
        ValueError: before any weight changes: a layer that is not an ``nn.Linear``, a width ``block`` does not
            divide, a layer already rotating its input, or a block size without a Hadamard construction.
    """
    OnlineHadamard(block)  # raises for sizes without a Hadamard construction, listing the supported ones
    for name, lin in linears:
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"hadamard_inputs: {name} is a {type(lin).__name__}; only nn.Linear inputs are rotated: "
                             "add it to the pass's ignore")
        if lin.in_features % block:
            raise ValueError(f"hadamard_inputs: {name} has {lin.in_features} inputs, not a multiple of block={block}: "
                             "add it to the pass's ignore or choose a block dividing it")
        if TRANSFORM_CHILD in lin._modules:
            raise ValueError(f"hadamard_inputs: {name} already rotates its input online (rotate's r4 / online_o, or "
                             "this pass twice): one online transform per linear; add it to this pass's ignore")
    with torch.no_grad():
        for _, lin in linears:
            hadamard = OnlineHadamard(lin.in_features, block=block).to(lin.weight.device)
            rotate_rows(lin.weight, hadamard)  # W ← W Q through the transform itself (x Q = forward(x))
            attach_input_transform(lin, hadamard)
    return len(linears)
