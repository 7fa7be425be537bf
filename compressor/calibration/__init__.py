"""Calibration and evaluation text: sources, the built-in SOTU corpus, token windows."""

from compressor.calibration.sampling import (
    CalibrationSet,
    calibration_set,
    eval_windows,
    ids_sha256,
    sample_windows,
    tokenize,
)
from compressor.calibration.sotu import sotu_dir, sotu_text
from compressor.calibration.sources import SOURCE_FORMS, load_text

__all__ = [
    "SOURCE_FORMS",
    "CalibrationSet",
    "calibration_set",
    "eval_windows",
    "ids_sha256",
    "load_text",
    "sample_windows",
    "sotu_dir",
    "sotu_text",
    "tokenize",
]
