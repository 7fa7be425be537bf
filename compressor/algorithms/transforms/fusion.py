"""What the equivalent transforms share (rotate, ostquant): finding a fresh decoder, folding norms into linears,
untying the head, choosing rotations, checking R3's attention modules, writing float64 results into weights.

Every function here changes a model only where its docstring says so; sizes and
architectures are checked before any weight changes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compressor.core.arch import attention_modules, find_blocks, layout_for
from compressor.core.hadamard import hadamard_factors, hadamard_transform, paley_matrix, random_hadamard, random_signs
from compressor.core.state import is_quantized
from compressor.runtime.activations import qk_rotations, wrapped_attention
from compressor.runtime.online import OnlineHadamard, online_transforms

ROW_CHUNK = 8192  # rows of a large weight (embedding, lm_head) handled in float64 at a time

__all__ = ["random_orthogonal", "rotation_matrix", "submodule", "write_param", "fold_norm", "untie_embeddings",
           "fresh_decoder", "r3_targets", "write_rows", "FastRandomHadamard", "rotation_operator"]


def random_orthogonal(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix: QR of a seeded Gaussian, signs fixed by diag(R) (SpinQuant's random init)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def rotation_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """(n, n) float64 orthogonal matrix of the given kind."""
    if kind == "hadamard":
        return random_hadamard(n, seed=seed)
    return random_orthogonal(n, seed=seed)


class FastRandomHadamard:
    """``x ↦ x Q`` for Q = :func:`~compressor.core.hadamard.random_hadamard` ``(n, seed)`` = H diag(s) / √n, by the
    fast transform: O(n log n + n m) per row instead of a dense (n, n) product (a (128256, 4096) embedding:
    about 6 GFLOP instead of 4.3 TFLOP). Equal to the dense product to float64 rounding.

    Call it on (..., n) float64 rows (on any device); :meth:`matrix` gives Q.
    """

    def __init__(self, n: int, seed: int = 0):
        _, m = hadamard_factors(n)  # raises for sizes without a construction
        self.size = n
        self.signs = random_signs(n, seed=seed)  # (n,) float64
        # hadamard_transform(x, base=B) is x @ kron(H_p, B)ᵀ: Bᵀ as the base gives x @ H
        self.base = paley_matrix(m).to(torch.float64).T.contiguous() if m > 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"FastRandomHadamard({self.size}) got rows of {x.shape[-1]}")
        base = None if self.base is None else self.base.to(device=x.device, dtype=x.dtype)
        return hadamard_transform(x, base=base) * self.signs.to(device=x.device, dtype=x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Q (n, n) in ``dtype``."""
        return self(torch.eye(self.size, dtype=torch.float64)).to(dtype)


def rotation_operator(kind: str, n: int, seed: int) -> "FastRandomHadamard | torch.Tensor":
    """What applies :func:`rotation_matrix` ``(kind, n, seed)`` to rows: the fast transform for ``"hadamard"``,
    the (n, n) float64 matrix for ``"random"``."""
    return FastRandomHadamard(n, seed) if kind == "hadamard" else random_orthogonal(n, seed=seed)


def submodule(root: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(f"rotate: {where} has no module {path!r}; the architecture does not match its layout") from None


def write_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a float64 result into a parameter, keeping its dtype and device."""
    param.data.copy_(value.to(param.dtype))


def write_rows(weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int = ROW_CHUNK) -> None:
    """``weight ← fn(weight)`` in place, row-wise, ``chunk`` rows at a time in float64.

    Args:
        weight: (R, d) parameter (or a view of one), any float dtype, kept; a float64 copy of at most ``chunk``
            rows is made at a time.
        fn: maps (r, d) float64 rows to (r, d) float64 rows, each row on its own.
    """
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start:start + chunk]
        write_param(rows, fn(rows.detach().double()))


def fold_norm(norm: nn.Module, readers: list, name: str, offset: float = 0.0) -> None:
    """RMSNorm scale g = offset + w into the weights that read its output: W ← W diag(g); w ← 1 - offset.

    Args:
        norm: an RMSNorm with a (d,) ``weight`` and no bias; it scales by ``offset + weight``
            (``offset`` 1 for Gemma's norms, 0 otherwise), so after the fold it scales by 1.
        readers: modules with a ``weight`` (..., d), or parameters (..., d) (fused experts' (E, N, d)),
            whose last dim multiplies the normalized stream; one reader listed twice (a fused
            ``qkv_proj`` as q, k and v) is folded once.
        name: the norm's name, for errors.

    Raises:
        ValueError: ``norm`` is not an RMSNorm with a (d,) weight and no bias.
    """
    g = getattr(norm, "weight", None)
    if not isinstance(g, torch.Tensor) or g.ndim != 1 or getattr(norm, "bias", None) is not None:
        raise ValueError(f"rotate: {name} ({type(norm).__name__}) is not an RMSNorm with a (d,) weight and no bias; "
                         "only RMSNorm decoders can be rotated exactly")
    g64 = g.detach().double() + offset
    seen: set[int] = set()
    for reader in readers:
        w = reader if isinstance(reader, torch.Tensor) else reader.weight
        if id(w) in seen:
            continue
        seen.add(id(w))
        scale = g64.to(w.device)
        # fused experts (E, N, d) one expert at a time, a (V, d) head in row chunks: a float64 copy of a
        # 128256 x 4096 lm_head would be 4.2 GB
        for piece in ([w[e] for e in range(w.shape[0])] if w.ndim == 3 else [w]):  # (N, d) each
            write_rows(piece, lambda x: x * scale)
    g.data.fill_(1.0 - offset)


def untie_embeddings(model: nn.Module, emb: nn.Module, head: nn.Module) -> bool:
    """Give lm_head its own copy of a tied embedding weight; True when it was tied."""
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False  # keep save_pretrained / tie_weights from re-tying them
    return True


def fresh_decoder(model: nn.Module, who: str, supports: frozenset[str] = frozenset()) -> tuple:
    """``(layout, blocks_name, blocks, embedding, lm_head)`` of a model neither rotated nor quantized.

    Args:
        supports: the :data:`compressor.core.arch.LAYOUT_FEATURES` the caller handles.

    Raises:
        ValueError: an unsupported family (or layout feature), a model already rotated or
            quantized, or no nn.Embedding input / nn.Linear lm_head.
    """
    layout = layout_for(model, who, supports=supports)
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


def r3_targets(model: nn.Module, head_dim: int) -> list[nn.Module]:
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
            wrapped_attention(attn, "rotate queries and keys (r3)")
        except ValueError as err:
            raise ValueError(f"rotate: {name}: {err}") from None
        size = getattr(attn, "head_dim", head_dim)
        if size != head_dim:
            raise ValueError(f"rotate: {name} has head_dim={size}, not the config's {head_dim}; set r3=false")
    return [attn for _, attn in found]
