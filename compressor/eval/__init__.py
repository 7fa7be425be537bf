"""Evaluation: perplexity, KL to a base model, multiple-choice and lm-eval tasks, speed, reports,
accelerate placement (offload) and data-parallel runs under ``accelerate launch``."""

from compressor.eval.choice import ChoiceItem, ChoiceResult, load_choice_tasks, score_choice_tasks
from compressor.eval.compare import WindowScores, score_windows
from compressor.eval.perplexity import PerplexityResult, perplexity, strided_windows
from compressor.eval.speed import SpeedResult, decode_speed, kernel_backend
from compressor.eval.suite import SuiteConfig, evaluate_models
from compressor.export.checkpoint import load_for_eval

__all__ = [
    "ChoiceItem",
    "ChoiceResult",
    "PerplexityResult",
    "SpeedResult",
    "SuiteConfig",
    "WindowScores",
    "decode_speed",
    "evaluate_models",
    "kernel_backend",
    "load_for_eval",
    "load_choice_tasks",
    "perplexity",
    "score_choice_tasks",
    "score_windows",
    "strided_windows",
]
