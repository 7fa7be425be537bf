"""Evaluate a base model and any number of compressed ones side by side: one row per model.

The first model is the base. Every other model is scored in lockstep with it on
the same token windows (perplexity and KL to the base), then on the
multiple-choice tasks and for speed; models other than the base are loaded one
at a time, so at most two models are in memory.

Placement goes through accelerate: ``device_map="auto"`` with ``max_memory`` and an
``offload_folder`` offloads what does not fit to CPU and disk; under
``accelerate launch`` the perplexity windows and task items are split over the
processes (:mod:`compressor.eval.distributed`) and only the main process
measures speed, writes dumps and reports rows (lm-evaluation-harness tasks run in one process only).
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compressor.core.hub import resolve_model
from compressor.eval.choice import ChoiceItem, load_choice_tasks, score_choice_tasks
from compressor.eval.compare import WindowScores, score_windows
from compressor.eval.distributed import is_main_process, num_processes, process_device
from compressor.eval.lmeval import require_lm_eval, run_lm_eval
from compressor.eval.perplexity import strided_windows
from compressor.eval.speed import decode_speed, kernel_backend
from compressor.export.checkpoint import load_for_eval
from compressor.export.placement import parse_max_memory, placement_summary

__all__ = ["SuiteConfig", "evaluate_models", "model_row"]

log = logging.getLogger(__name__)

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    """Settings of one comparison run.

    Attributes:
        dataset: text source for perplexity and KL (any form :func:`compressor.calibration.load_text` reads).
        ctx, stride, max_tokens: windows, see :func:`compressor.eval.perplexity.strided_windows`
            (``max_tokens=None``: the whole text).
        batch_size: windows per forward pass.
        tasks: a JSONL multiple-choice task file or a shipped task name (``"phrases"``); None skips tasks.
        lm_eval_tasks: lm-evaluation-harness task names (``("hellaswag", "arc_easy")``); needs the
            ``compressor[lmeval]`` extra. Their metrics become ``<task>/<metric>`` row fields.
        lm_eval_limit: documents per lm-eval task (a fraction when < 1); None = all.
        decode_tokens: greedy decode steps timed per model; 0 skips the speed measurement.
        prompt_tokens: prompt length for the speed measurement (the first tokens of the text).
        dtype: ``"auto"`` (as stored), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        backend: dequant-matmul backend for exports (``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"``).
        device_map: None (CPU; under ``accelerate launch`` each process's device), ``"auto"`` or an
            accelerate device map.
        max_memory: accelerate ``max_memory`` per device for ``device_map="auto"``, a dict
            (``{"cpu": "200MB", 0: "10GiB"}``) or the string form ``"cpu=200MB,0=10GiB"``.
        offload_folder: where modules that fit nowhere are offloaded to disk; each model gets a
            fresh subfolder there, removed when it is unloaded.
        dump_dir: write ``<label>.safetensors`` there with per-token ``nll`` (float32 (T,)),
            ``kl`` to the base (compared models) and the scored ``target_ids`` (int64 (T,)).
        quiet: no progress bars.
        revision: branch, tag or commit for every model given as a Hub repo id (directories ignore it).
        trust_remote_code: allow a repo's own modelling code to run (off by default).
    """

    dataset: str = "sotu:2010-2021"
    ctx: int = 512
    stride: int | None = None
    max_tokens: int | None = 32768
    batch_size: int = 4
    tasks: str | Path | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | float | None = None
    decode_tokens: int = 32
    prompt_tokens: int = 32
    dtype: str = "auto"
    backend: str = "auto"
    device_map: str | dict | None = None
    max_memory: dict | str | None = None
    offload_folder: Path | None = None
    dump_dir: Path | None = None
    quiet: bool = False
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        for name in ("ctx", "batch_size", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.decode_tokens < 0:
            raise ValueError(f"decode_tokens={self.decode_tokens} must be >= 0 (0 skips the speed measurement)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: use a positive count or None for the whole text")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown: use one of {sorted(_DTYPES)}")
        if isinstance(self.lm_eval_tasks, str) or not all(isinstance(t, str) and t for t in self.lm_eval_tasks):
            raise ValueError(f"lm_eval_tasks={self.lm_eval_tasks!r}: use a list of task names, e.g. ['hellaswag']")
        object.__setattr__(self, "lm_eval_tasks", tuple(self.lm_eval_tasks))
        if self.lm_eval_limit is not None and not self.lm_eval_limit > 0:
            raise ValueError(f"lm_eval_limit={self.lm_eval_limit}: use a positive count, a fraction, or None for all")
        object.__setattr__(self, "max_memory", parse_max_memory(self.max_memory))
        if (self.max_memory or self.offload_folder) and self.device_map is None:
            raise ValueError("max_memory and offload_folder need accelerate placement: set device_map='auto' "
                             "(--device-map auto)")

    def to_dict(self) -> dict:
        """The settings as JSON-ready values."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def model_row(path: str | Path, label: str, role: str) -> dict:
    """The static part of a row: size on disk and bits per weight from the safetensors headers.

    Returns:
        dict with ``model``, ``label``, ``role``, ``bits_per_weight`` (quantized linears incl.
        scales and zero points; the dominant dtype width for a plain checkpoint),
        ``model_bits_per_param`` (whole model), ``size_mb`` (all files, 1e6 bytes), ``params``,
        ``quantized_layers``.
    """
    from compressor.export.summary import summarize

    info = summarize(Path(path))
    return {"model": str(path), "label": label, "role": role, "bits_per_weight": info["bits_per_weight"],
            "model_bits_per_param": info["model_bits_per_param"], "size_mb": info["size_bytes"] / 1e6,
            "params": info["params"], "quantized_layers": info["quantized_layers"]}


def _labels(paths: list[Path]) -> list[str]:
    """Directory names; the full path where two share a name; ``#k`` where a path repeats."""
    names = [p.name or str(p) for p in paths]
    labels = [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [f"{lab}#{labels[:i].count(lab) + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _check_inputs(paths: list[Path], config: SuiteConfig) -> None:
    """Fail before any model loads: missing or corrupt checkpoints, a context the models cannot take,
    lm-eval tasks without lm_eval."""
    from compressor.export.checkpoint import check_checkpoint
    from compressor.export.loader import read_config

    if config.lm_eval_tasks:
        require_lm_eval()
        if num_processes() > 1:  # other ranks would wait in a collective, past its timeout, while rank 0 ran them
            raise ValueError(f"lm-eval tasks {', '.join(config.lm_eval_tasks)} run in one process: evaluate them "
                             "without accelerate launch, or launch lm-eval itself (accelerate launch -m lm_eval ...)")
    for path in paths:
        check_checkpoint(path)
        cfg = read_config(path)
        cfg = cfg.get("text_config", cfg)
        limit = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        if limit and config.ctx > limit:
            raise ValueError(f"ctx={config.ctx} exceeds the max_position_embeddings={limit} of {path}: "
                             f"use --ctx {limit} or less")


def _tokenizer(paths: list[Path], trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer; every other model that ships one must have the same vocabulary."""
    from compressor.export.checkpoint import load_tokenizer

    tok = load_tokenizer(paths[0], trust_remote_code=trust_remote_code)
    vocab = tok.get_vocab()
    for path in paths[1:]:
        other = load_tokenizer(path, required=False, trust_remote_code=trust_remote_code)
        if other is not None and other.get_vocab() != vocab:
            raise ValueError(f"{path} has a different tokenizer from the base {paths[0]}: perplexity and KL compare "
                             "models on the same tokens; evaluate it against a base with its own tokenizer")
    return tok


def _measure(model: nn.Module, tok: Any, items: list[ChoiceItem] | None, prompt: torch.Tensor,
             config: SuiteConfig) -> dict:
    """Tasks, speed and kernel backend of one loaded model; speed on the main process only."""
    row: dict = {"backend": kernel_backend(model), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                 "placement": placement_summary(model)}
    if items:
        res = score_choice_tasks(model, tok, items, quiet=config.quiet)
        row.update(task_acc=res.acc, task_acc_norm=res.acc_norm, task_items=res.items)
    if not is_main_process():
        return row
    if config.lm_eval_tasks:
        row |= run_lm_eval(model, tok, config.lm_eval_tasks, batch_size=config.batch_size, limit=config.lm_eval_limit)
    if config.decode_tokens:
        speed = decode_speed(model, prompt, config.decode_tokens)
        row.update(prefill_tok_s=speed.prefill_tok_s, decode_tok_s=speed.decode_tok_s, decode_ms=speed.decode_ms,
                   peak_mem_mb=speed.peak_mem_mb)
    return row


def _load(path: Path, label: str, config: SuiteConfig, stack: ExitStack) -> nn.Module:
    """Load one model as the config places it; a disk-offload subfolder lives as long as ``stack``."""
    offload = None
    if config.offload_folder is not None:
        Path(config.offload_folder).mkdir(parents=True, exist_ok=True)
        prefix = f"{label.replace('/', '_')}-"
        offload = stack.enter_context(tempfile.TemporaryDirectory(dir=config.offload_folder, prefix=prefix,
                                                                  ignore_cleanup_errors=True))
    model = load_for_eval(path, dtype=_DTYPES[config.dtype], backend=config.backend, device_map=config.device_map,
                          max_memory=config.max_memory, offload_folder=offload, device=process_device(),
                          trust_remote_code=config.trust_remote_code)
    log.info("%s placed on %s", label, placement_summary(model))
    return model


def _dump(config: SuiteConfig, label: str, scores_nll: torch.Tensor | None, kl: torch.Tensor | None,
          targets: torch.Tensor) -> None:
    from safetensors.torch import save_file

    if config.dump_dir is None or scores_nll is None or not is_main_process():
        return
    out = Path(config.dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"nll": scores_nll.contiguous(), "target_ids": targets.contiguous()}
    if kl is not None:
        tensors["kl"] = kl.contiguous()
    file = out / f"{label.replace('/', '_')}.safetensors"
    save_file(tensors, str(file))
    log.info("per-token NLL of %s written to %s", label, file)


def _ppl_fields(scores: WindowScores, base: bool) -> dict:
    res = scores.base_ppl if base else scores.ppl
    return {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "windows": res.windows,
            "kl_to_base": 0.0 if base else scores.kl, "top1_agree": 1.0 if base else scores.top1_agree}


def evaluate_models(
    models: list[str | Path],
    config: SuiteConfig | None = None,
    *,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Evaluate a base model and compressed models; one row (dict) per model, the base first.

    Row fields: ``model``, ``label``, ``role`` (``"base"``/``"compared"``), ``ppl``, ``nll``,
    ``tokens``, ``windows``, ``kl_to_base`` (mean KL(p_base || p_model) per scored token, nats),
    ``top1_agree`` (fraction of tokens with the same most likely next token as the base),
    ``task_acc``, ``task_acc_norm``, ``task_items`` (with tasks), ``<task>/<metric>`` (with
    lm-eval tasks), ``bits_per_weight``, ``model_bits_per_param``, ``size_mb``, ``params``,
    ``quantized_layers``, ``prefill_tok_s``, ``decode_tok_s``, ``decode_ms``, ``peak_mem_mb``
    (with decode_tokens), ``backend`` (``"dense"`` or the dequant-matmul implementation),
    ``dtype``, ``placement`` (``"cpu"`` or module counts per device, e.g. ``"cpu:2 disk:3"``), ``eval_s``.

    Under ``accelerate launch`` every process returns the rows; speed is measured on the main
    process only, and ``on_row`` is called there only; lm-eval tasks are refused there.

    Args:
        models: model directories, exports or Hub repo ids; the first is the base.
        config: settings (default :class:`SuiteConfig`).
        on_row: called with each row as soon as it is complete.

    Raises:
        FileNotFoundError / ValueError: a missing or corrupt model, an empty text, a context longer
            than a model allows, a bad task file, models with different tokenizers, lm-eval tasks
            in a multi-process launch.
        ImportError: lm-eval tasks without the ``lm_eval`` package.
    """
    from compressor.calibration import load_text, tokenize

    config = config or SuiteConfig()
    if not models:
        raise ValueError("no models to evaluate: pass a base model directory, then any exports to compare")
    labels = _labels([Path(m) for m in models])  # a Hub id's label is its name, not its snapshot hash
    paths = [resolve_model(m, revision=None if Path(m).is_dir() else config.revision,
                           trust_remote_code=config.trust_remote_code) for m in models]
    _check_inputs(paths, config)
    items = load_choice_tasks(config.tasks) if config.tasks else None
    tok = _tokenizer(paths, config.trust_remote_code)
    ids = tokenize(load_text(config.dataset), tok)  # (T,)
    windows = strided_windows(ids, config.ctx, config.stride, config.max_tokens)  # validates the length early
    targets = torch.cat([w[first:] for w, first in windows])  # (tokens,) in scoring order
    prompt = ids[: min(config.prompt_tokens, config.ctx)]
    window_kw = dict(ctx=config.ctx, stride=config.stride, max_tokens=config.max_tokens,
                     batch_size=config.batch_size, keep_tokens=config.dump_dir is not None,
                     quiet=config.quiet or not is_main_process())
    emit = on_row if on_row is not None and is_main_process() else (lambda row: None)

    with ExitStack() as base_stack:
        start = time.perf_counter()
        log.info("loading base %s", paths[0])
        base = _load(paths[0], labels[0], config, base_stack)
        base_row = model_row(paths[0], labels[0], "base") | _measure(base, tok, items, prompt, config)
        base_time = time.perf_counter() - start
        rows = [base_row]
        if len(paths) == 1:
            scores = score_windows(base, ids, **window_kw)
            base_row.update(ppl=scores.ppl.ppl, nll=scores.ppl.nll, tokens=scores.ppl.tokens,
                            windows=scores.ppl.windows, kl_to_base=0.0, top1_agree=1.0)
            _dump(config, labels[0], scores.token_nll, None, targets)
            base_row["eval_s"] = time.perf_counter() - start
            emit(base_row)
        for i, (path, label) in enumerate(zip(paths[1:], labels[1:])):
            with ExitStack() as stack:
                start = time.perf_counter()
                log.info("loading %s", path)
                model = _load(path, label, config, stack)
                scores = score_windows(model, ids, base=base, **window_kw)
                if i == 0:  # the base's perplexity comes from the first lockstep pass
                    base_row.update(_ppl_fields(scores, base=True))
                    _dump(config, labels[0], scores.base_token_nll, None, targets)
                    base_row["eval_s"] = base_time + (time.perf_counter() - start) / 2
                    emit(base_row)
                row = model_row(path, label, "compared") | _ppl_fields(scores, base=False)
                row |= _measure(model, tok, items, prompt, config)
                _dump(config, label, scores.token_nll, scores.token_kl, targets)
                row["eval_s"] = time.perf_counter() - start
                rows.append(row)
                emit(row)
                del model, scores
                gc.collect()
        del base
        gc.collect()
    return rows
