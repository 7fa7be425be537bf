"""Distillation trainer on accelerate: the compressed model learns the original's next-token distribution.

One :class:`DistillConfig` and one function, :func:`distill`. The student
(quantized, pruned or smaller) is trained in place against a frozen teacher with
the chunked logit loss (:func:`compressor.algorithms.distill.chunked.chunked_distill_loss`),
so neither model's full ``(tokens, vocab)`` logits are held.

Data order is a function of the step alone: the windows are shuffled once per
epoch with ``seed + epoch`` and step ``t`` takes the ``t``-th global batch. Under
``accelerate launch`` each process takes its contiguous share of every global
batch and accelerate averages the gradients, so N processes follow the very
loss curve of one process with the same global batch. A checkpoint holds the
student, the optimizer, the scheduler and the step, so a resumed run neither
repeats nor skips a batch.

Students keep their compression while they learn (:mod:`compressor.algorithms.distill.students`):
pruned weights stay zero, quantized weights stay on their grid through a
straight-through estimator and are re-packed at export.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compressor.algorithms.distill.chunked import CHUNKED_KINDS, chunked_distill_loss
from compressor.algorithms.distill.students import StudentState, prepare_student
from compressor.core.progress import progress

__all__ = ["TrainSettings", "DistillConfig", "DistillResult", "distill", "global_batch"]

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
_STATE = "trainer_state.json"


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The training knobs of a distillation run, shared by :class:`DistillConfig` and the ``distill`` pass's config.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per optimizer step over all processes (the global batch).
        grad_accum: micro-batches per process per step; ``batch_size`` must be a
            multiple of ``processes * grad_accum``.
        lr: AdamW learning rate (peak, after warm-up).
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps with a linear warm-up; cosine decay to 10% after.
        kind: divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        temperature: softmax temperature (the divergence is scaled by T**2).
        alpha: weight of the ground-truth next-token cross entropy, in [0, 1].
        chunk_size: tokens per chunk of the logit loss.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate autocast).
        gradient_checkpointing: recompute the student's activations in backward.
        max_grad_norm: gradient clipping (0: off).
    """

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: float = 0.05
    kind: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    chunk_size: int = 256
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0


@dataclass(frozen=True, kw_only=True)
class DistillConfig(TrainSettings):
    """Settings of one distillation run: the :class:`TrainSettings`, plus

    Attributes:
        checkpoint_every: save a resumable checkpoint every this many steps (0: at the end only).
        eval_every: call the ``evaluate`` callback every this many steps (0: never).
        seed: data order and any randomness of the run.
        quiet: no progress bar.
    """

    checkpoint_every: int = 0
    eval_every: int = 0
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: use a positive integer")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: use 0 (off) or a positive number of steps")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: use a positive learning rate, e.g. 1e-5")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup}: use a fraction of the steps in [0, 1)")
        if self.kind not in CHUNKED_KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {CHUNKED_KINDS}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: use a positive temperature, e.g. 1.0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: the cross-entropy weight is in [0, 1]")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use one of {MIXED_PRECISION}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: use 0 (off) or a positive norm")


@dataclass
class DistillResult:
    """What a run did.

    Attributes:
        losses: the global mean loss of every step run in this call, (step, loss).
        steps_done: the last completed step (counting resumed ones).
        tokens_seen: tokens of student forward passes over the whole run (all processes).
        wall_s: seconds of this call.
        evals: (step, value) of every ``evaluate`` call.
    """

    losses: list[tuple[int, float]]
    steps_done: int
    tokens_seen: int
    wall_s: float
    evals: list[tuple[int, float]]


def global_batch(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of the global batch of ``step`` (0-based): a pure function of the step.

    Rows are visited in a permutation drawn once per epoch from ``seed + epoch``;
    a batch may straddle two epochs.

    Returns:
        (batch_size,) int64 indices into the ``n`` training windows.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.int64)


class _StudentLoss(nn.Module):
    """The student and its loss in one forward, so accelerate's wrapper (DDP) sees the whole graph."""

    def __init__(self, student: nn.Module, config: DistillConfig):
        super().__init__()
        self.student = student
        self.config = config

    def forward(self, input_ids: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: torch.Tensor) -> torch.Tensor:
        body = self.student.get_decoder() if hasattr(self.student, "get_decoder") else self.student.model
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, D), after the final norm
        labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)  # next token
        cfg = self.config
        return chunked_distill_loss(hidden, self.student.get_output_embeddings().weight, teacher_hidden, teacher_head,
                                    kind=cfg.kind, temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                                    labels=labels if cfg.alpha > 0 else None, alpha=cfg.alpha)


@torch.no_grad()
def _teacher_hidden(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    body = teacher.get_decoder() if hasattr(teacher, "get_decoder") else teacher.model
    device = next(teacher.parameters()).device
    return body(input_ids=ids.to(device), use_cache=False).last_hidden_state


def _schedule(config: DistillConfig) -> Callable[[int], float]:
    warm = int(config.warmup * config.steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_ = (step - warm) / max(1, config.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    return factor


def _check_models(teacher: nn.Module, student: nn.Module, data: torch.Tensor) -> None:
    for role, m in (("teacher", teacher), ("student", student)):
        if m.get_output_embeddings() is None:
            raise ValueError(f"the {role} has no output embeddings (lm_head): distillation needs causal LMs")
    vt, vs = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise ValueError(f"teacher vocabulary {vt} != student vocabulary {vs}: they must share a tokenizer")
    if data.ndim != 2 or data.dtype != torch.int64:
        raise ValueError(f"training data must be int64 (S, L) token windows, got {data.dtype} {tuple(data.shape)}")
    if int(data.max()) >= vs or int(data.min()) < 0:
        raise ValueError(f"token ids outside the vocabulary [0, {vs}): the data was tokenized for another model")


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: torch.Tensor,
    config: DistillConfig = DistillConfig(),
    *,
    output_dir: str | Path | None = None,
    resume: bool = True,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> DistillResult:
    """Train ``student`` in place to match ``teacher`` on ``data``.

    Args:
        teacher: frozen causal LM (kept in eval mode, no gradients; it stays on
            its own device, so it can be CPU-offloaded while the student trains on GPU).
        student: causal LM sharing the teacher's vocabulary; pruned and quantized
            layers keep their masks and grids (:func:`~compressor.algorithms.distill.students.prepare_student`).
        data: (S, L) int64 token windows.
        config: the run's settings.
        output_dir: where resumable checkpoints go (``output_dir/checkpoint``);
            None: no checkpoints.
        resume: continue from ``output_dir/checkpoint`` when it exists.
        evaluate: ``evaluate(student) -> float`` called every ``eval_every`` steps
            (e.g. perplexity on held-out text), on the main process.

    Returns:
        :class:`DistillResult`. The student ends with its compression state
        restored (on-grid weights and quantization parameters), ready to export.
    """
    from accelerate import Accelerator

    _check_models(teacher, student, data)
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.mixed_precision:
        # accelerate keeps one process-wide state; a second run in this process with another precision
        # needs it cleared (the process group, held by PartialState, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    procs = accelerator.num_processes
    if config.batch_size % (procs * config.grad_accum):
        raise ValueError(f"batch_size={config.batch_size} is not a multiple of processes ({procs}) x grad_accum "
                         f"({config.grad_accum}): every micro-batch must hold the same number of sequences")
    micro = config.batch_size // (procs * config.grad_accum)
    teacher.eval().requires_grad_(False)
    state: StudentState = prepare_student(student)
    student.train()
    if config.gradient_checkpointing:
        _checkpointing(student, True)
    wrapper = _StudentLoss(student, config)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config))
    # the schedule counts optimizer steps: not prepared, since accelerate would step it once per process
    wrapper, opt = accelerator.prepare(wrapper, opt)
    accelerator.register_for_checkpointing(sched)
    ckpt = Path(output_dir) / "checkpoint" if output_dir is not None else None
    start = 0
    if ckpt is not None and resume and (ckpt / _STATE).is_file():
        saved = json.loads((ckpt / _STATE).read_text(encoding="utf-8"))
        if saved["config"] != _training_settings(config):
            raise ValueError(f"{ckpt} belongs to a run with other settings; delete it or pass resume=False")
        accelerator.load_state(str(ckpt))
        start = saved["step"]
        log.info("resumed from %s at step %d", ckpt, start)
    seq = data.shape[1]
    losses, evals = [], []
    t0 = time.perf_counter()
    quiet = config.quiet or not accelerator.is_main_process
    bar = progress(range(start, config.steps), "distill", quiet=quiet, total=config.steps - start)
    log_every = max(1, config.steps // 20)  # without a bar, progress goes to the log ~20 times per run
    for step in bar:
        rows = global_batch(step, data.shape[0], config.batch_size, config.seed)
        share = rows[accelerator.process_index * micro * config.grad_accum:][: micro * config.grad_accum]
        total = torch.zeros((), dtype=torch.float64)
        for j in range(config.grad_accum):
            ids = data[share[j * micro : (j + 1) * micro]].to(accelerator.device)  # (micro, L)
            th = _teacher_hidden(teacher, ids).to(accelerator.device)
            head = teacher.get_output_embeddings().weight.detach().to(accelerator.device)
            with accelerator.autocast():
                loss = wrapper(ids, th, head) / config.grad_accum
            if j < config.grad_accum - 1:
                with accelerator.no_sync(wrapper):
                    accelerator.backward(loss)
            else:
                accelerator.backward(loss)
            total += loss.detach().double().cpu()
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.after_step()  # pruned weights back to zero
        mean = float(accelerator.gather(total.to(accelerator.device).reshape(1)).double().mean())
        losses.append((step + 1, mean))
        tok_s = (step + 1 - start) * config.batch_size * seq / (time.perf_counter() - t0)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{tok_s:.0f}")
        if accelerator.is_main_process and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            log.info("distill step %d/%d: loss %.4f, %.0f tokens/s", step + 1, config.steps, mean, tok_s)
        else:
            log.debug("step %d loss %.6f", step + 1, mean)
        if config.eval_every and evaluate is not None and (step + 1) % config.eval_every == 0 and accelerator.is_main_process:
            student.eval()
            evals.append((step + 1, float(evaluate(student))))
            student.train()
            log.info("step %d: eval %.4f", step + 1, evals[-1][1])
        last = step + 1 == config.steps
        if ckpt is not None and (last or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            _save(accelerator, ckpt, step + 1, config)
    accelerator.wait_for_everyone()
    if config.gradient_checkpointing:
        _checkpointing(student, False)
    student.eval()
    state.finish()  # quantized layers: weights re-snapped to their grid, parametrizations removed
    accelerator.free_memory()
    return DistillResult(losses=losses, steps_done=config.steps, tokens_seen=config.steps * config.batch_size * seq,
                         wall_s=round(time.perf_counter() - t0, 2), evals=evals)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, under the name this transformers version uses."""
    stem = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if not hasattr(model, f"{stem}_enable"):
        raise ValueError(f"{type(model).__name__} has no {stem}_enable(): set gradient_checkpointing=False")
    getattr(model, f"{stem}_{'enable' if on else 'disable'}")()


def _training_settings(config: DistillConfig) -> dict:
    """The settings a checkpoint must share with the run resuming it (not logging or checkpoint cadence)."""
    return {k: v for k, v in asdict(config).items() if k not in ("quiet", "eval_every", "checkpoint_every")}


def _save(accelerator, ckpt: Path, step: int, config: DistillConfig) -> None:
    """Write a resumable checkpoint atomically: into a sibling directory, then renamed over the old one."""
    import shutil

    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # a save torn by an earlier interruption
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        meta = {"step": step, "config": _training_settings(config)}
        (tmp / _STATE).write_text(json.dumps(meta), encoding="utf-8")
        if ckpt.exists():
            ckpt.rename(old)
        tmp.rename(ckpt)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    log.info("checkpoint at step %d in %s", step, ckpt)
