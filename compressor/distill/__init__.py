"""Knowledge distillation: logit, list-wise and hidden-state losses; the trainer on accelerate and its students."""

from compressor.distill.chunked import chunked_distill_loss, naive_distill_loss
from compressor.distill.hidden import hidden_state_loss, make_projections
from compressor.distill.losses import (
    cross_entropy,
    distill_loss,
    divergence,
    forward_kl,
    jsd,
    reduce_tokens,
    reverse_kl,
    topk_kl,
)
from compressor.distill.pld import plackett_luce_loss, teacher_permutation
from compressor.distill.students import drop_layers, prepare_student, trainable_from_export
from compressor.distill.trainer import DistillConfig, DistillResult, distill

__all__ = [
    "DistillConfig",
    "DistillResult",
    "chunked_distill_loss",
    "cross_entropy",
    "distill",
    "distill_loss",
    "divergence",
    "drop_layers",
    "forward_kl",
    "hidden_state_loss",
    "jsd",
    "make_projections",
    "naive_distill_loss",
    "plackett_luce_loss",
    "prepare_student",
    "reduce_tokens",
    "reverse_kl",
    "teacher_permutation",
    "topk_kl",
    "trainable_from_export",
]
