"""Online (run-time) rotations of a linear layer's input.

An online rotation is kept as a child module ``input_transform`` of the
``nn.Linear`` it feeds, applied by a forward pre-hook on that linear::

    down_proj                      (nn.Linear, weight already multiplied by Q)
    └── input_transform            (OnlineHadamard: x ↦ x Q, Q = H_nᵀ / √n)

So the linear keeps its name and its ``weight``/``bias`` keys (recipes and
exports target ``...mlp.down_proj`` as before), the rotation is visible in
``print(model)``, and hooks that calibration passes register later on the
linear (GPTQ's pre-hook, a forward hook) see the rotated input, which is the
input the fused weight multiplies. The hook is a module-level function, so
``copy.deepcopy`` and pickling keep it.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.hadamard import hadamard_factors, hadamard_transform, paley_matrix

__all__ = ["TRANSFORM_CHILD", "OnlineHadamard", "attach_input_transform", "detach_input_transform", "online_transforms",
           "is_input_transform_hook"]

TRANSFORM_CHILD = "input_transform"


class OnlineHadamard(nn.Module):
    """x ↦ x H_nᵀ / √n along the last dim (QuaRot, arXiv 2404.00456, §4: online Hadamard before down_proj), or,
    with ``block``, the same Hadamard of size ``block`` on each consecutive ``block`` entries of the last dim
    (block-diagonal Q: the block-wise rotations MR-GPTQ, arXiv 2509.23202, fits to FP4 groups).

    Args:
        size: n, the last dim of the input; without ``block``, ``2^a * m`` (see :func:`hadamard_factors`).
        block: b, the size of each diagonal block (``2^a * m`` as well, dividing n), or None for one full
            Hadamard of size n.

    The (m, m) Paley factor is a non-persistent buffer: it moves with
    ``.to(device)`` and never enters the state dict. Half-precision inputs are
    rotated in float32 and cast back.
    """

    def __init__(self, size: int, block: int | None = None):
        super().__init__()
        if block is not None and (block < 1 or size % block):
            raise ValueError(f"a block-diagonal Hadamard of blocks of {block} does not tile width {size}: use a block "
                             "size dividing it")
        width = size if block is None or block == size else block
        _, m = hadamard_factors(width)
        self.size = size
        self.block = None if width == size else width
        self.register_buffer("base", paley_matrix(m).to(torch.float32) if m > 1 else None, persistent=False)

    @property
    def width(self) -> int:
        """The size of each Hadamard block (``size`` when the transform is one full Hadamard)."""
        return self.block or self.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) → (..., n), same dtype.

        fp16 / bf16 inputs on a CUDA device run the Triton kernel
        (:mod:`compressor.kernels.triton.hadamard`, one launch, tensor cores)
        when triton imports and the size has a plan; everything else runs the
        torch butterfly in float32 (float64 stays float64).
        """
        if x.shape[-1] != self.size:
            raise ValueError(f"OnlineHadamard({self.size}) got an input with last dim {x.shape[-1]}")
        shape = x.shape
        if self.block is not None:  # (..., n) -> (..., n / b, b): each block rotated alone
            x = x.reshape(*shape[:-1], self.size // self.block, self.block)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _triton_plan(self.width):
            from compressor.kernels.triton.hadamard import hadamard_transform as triton_hadamard

            return triton_hadamard(x).reshape(shape)
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        base = None if self.base is None else self.base.to(device=work.device, dtype=work.dtype)
        return hadamard_transform(work, base=base).to(x.dtype).reshape(shape)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The orthogonal Q (n, n) with forward(x) = x @ Q (Q = H_nᵀ / √n; block-diagonal with ``block``)."""
        return self(torch.eye(self.size, dtype=dtype, device=None if self.base is None else self.base.device))

    def extra_repr(self) -> str:
        return f"size={self.size}" + (f", block={self.block}" if self.block else "")


def _triton_plan(n: int) -> bool:
    """Whether the Triton Hadamard kernel can run size n here (triton imports and n has a plan)."""
    from compressor.kernels.dispatch import triton_unavailable

    if triton_unavailable() is not None:
        return False
    from compressor.kernels.triton.hadamard import plan

    return plan(n) is not None


def map_input(module: nn.Module, args: tuple, kwargs: dict, child: str):
    """A linear's call arguments with its input x replaced by ``module.<child>(x)`` (for forward pre-hooks)."""
    fn = module._modules[child]
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    if "input" in kwargs:
        return args, {**kwargs, "input": fn(kwargs["input"])}
    raise ValueError(f"{type(module).__name__} was called without an input for its {child}")


def _rotate_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: replace the linear's input x by ``module.input_transform(x)``."""
    return map_input(module, args, kwargs, TRANSFORM_CHILD)


def is_input_transform_hook(hook) -> bool:
    """Whether ``hook`` (a forward pre-hook) is the one :func:`attach_input_transform` registers."""
    return hook is _rotate_input


def attach_input_transform(linear: nn.Linear, transform: nn.Module) -> None:
    """Run ``transform`` on every input of ``linear`` from now on (in place).

    The caller fuses the inverse into the weight first: with forward(x) = x Q,
    ``linear.weight ← linear.weight Q`` keeps the output unchanged (Q Qᵀ = I).

    Raises:
        ValueError: ``linear`` already has an online transform, or is not a Linear.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"online transforms attach to nn.Linear, got {type(linear).__name__}")
    if TRANSFORM_CHILD in linear._modules:
        raise ValueError(f"{linear} already has an online {TRANSFORM_CHILD}; rotate a fresh model")
    linear.add_module(TRANSFORM_CHILD, transform)
    linear.register_forward_pre_hook(_rotate_input, with_kwargs=True)


def detach_input_transform(linear: nn.Module) -> bool:
    """Undo :func:`attach_input_transform` on ``linear`` (its weight is left as it is); True when it had one."""
    if TRANSFORM_CHILD not in linear._modules:
        return False
    del linear._modules[TRANSFORM_CHILD]
    for key, hook in list(linear._forward_pre_hooks.items()):
        if is_input_transform_hook(hook):
            del linear._forward_pre_hooks[key]
            linear._forward_pre_hooks_with_kwargs.pop(key, None)
    return True


def online_transforms(model: nn.Module) -> list[str]:
    """Qualified names of the linears of ``model`` that rotate their input at run time."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and TRANSFORM_CHILD in m._modules]
