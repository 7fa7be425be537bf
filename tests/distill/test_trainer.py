"""The distillation trainer on tiny Llamas: it learns, students keep their compression, resume is exact, 2 processes = 1."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.helpers import launch_two_cpu_processes, tiny_llama
from torch import nn

from compressor import Recipe, compress
from compressor.algorithms.distill.students import drop_layers, prepare_student
from compressor.pipeline.trainer import DistillConfig, distill, global_batch
from compressor.export.compressed_tensors import save_compressed
from compressor.pipeline.sequential import PipelineConfig
from compressor.algorithms.prune.masks import is_nm
from compressor.core.sparsity import prune_mask
from compressor.core.scheme import fake_quant
from compressor.core.state import quant_state

DATA = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(1))
QUIET = PipelineConfig(batch_size=4, quiet=True)
FAST = DistillConfig(steps=25, batch_size=4, lr=3e-3, warmup=0.0, quiet=True)


def _kl(teacher, student, ids=DATA):
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).logits, -1)
        q = torch.log_softmax(student(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _teacher(layers=2):
    """A tiny Llama with weights scaled up so its next-token distributions are peaked (random init is near uniform)."""
    model = tiny_llama(layers=layers)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    return model


def _compressed(passes):
    model = _teacher()
    compress(model, Recipe.from_dict({"passes": passes}), calibration=DATA, pipeline=QUIET, quiet=True)
    return model


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]


def test_global_batch_is_a_function_of_the_step():
    rows = [global_batch(s, 10, 4, seed=0) for s in range(5)]  # 20 rows: two epochs
    assert torch.equal(global_batch(3, 10, 4, seed=0), rows[3])
    first_epoch = torch.cat(rows)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))  # every window once per epoch
    assert not torch.equal(global_batch(0, 10, 4, seed=1), rows[0])


def test_pruned_student_learns_and_keeps_its_nm_masks(caplog):
    teacher = _teacher()
    student = _compressed([{"prune": {"method": "magnitude", "structure": "2:4"}}])
    masks = {n: prune_mask(m).clone() for n, m in _linears(student)}
    before = _kl(teacher, student)
    with caplog.at_level("INFO", logger="compressor.pipeline.trainer"):
        result = distill(teacher, student, DATA, FAST)
    steps_logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distill step")]
    assert len(steps_logged) == 25 and steps_logged[-1].startswith("distill step 25/25: loss")  # quiet: progress in the log
    assert _kl(teacher, student) < 0.7 * before
    assert result.losses[-1][1] < result.losses[0][1] and result.tokens_seen == 25 * 4 * 24
    for name, m in _linears(student):
        assert torch.equal(prune_mask(m), masks[name]) and is_nm(m.weight != 0, 2, 4), name
    assert all(not p.requires_grad for p in teacher.parameters())


def test_quantized_student_stays_on_its_grid_and_exports(tmp_path):
    teacher = _teacher()
    student = _compressed([{"rtn": {"scheme": {"bits": 3, "group_size": 16, "symmetric": False}}}])
    qparams = {n: quant_state(m)[1] for n, m in _linears(student)}
    before = _kl(teacher, student)
    distill(teacher, student, DATA, FAST)
    assert _kl(teacher, student) < 0.8 * before
    changed = 0
    for name, m in _linears(student):
        scheme, qp, g_idx = quant_state(m)
        assert torch.equal(qp.scale, qparams[name].scale), name  # grid fixed: only the codes moved
        assert torch.equal(fake_quant(m.weight, qp, scheme, g_idx), m.weight), name
        assert type(m) is nn.Linear and not hasattr(m, "parametrizations"), name
        changed += 1
    assert changed == 14
    save_compressed(student, tmp_path / "export")  # re-packs like any quantized model


def test_pruned_and_quantized_student_keeps_both():
    teacher = _teacher()
    student = _compressed([{"prune": {"method": "wanda", "structure": "2:4"}},
                           {"gptq": {"scheme": {"bits": 4, "group_size": 16}}}])
    distill(teacher, student, DATA, DistillConfig(steps=5, batch_size=4, lr=3e-3, quiet=True))
    for name, m in _linears(student):
        scheme, qp, g_idx = quant_state(m)
        assert not (m.weight[~prune_mask(m)] != 0).any(), name
        assert torch.equal(fake_quant(m.weight, qp, scheme, g_idx), m.weight), name


def test_interrupt_and_resume_repeats_and_skips_nothing(tmp_path):
    teacher = _teacher()
    base = _compressed([{"prune": {"method": "magnitude", "sparsity": 0.5}}])
    cfg = DistillConfig(steps=8, batch_size=4, lr=3e-3, checkpoint_every=3, quiet=True)
    full = copy.deepcopy(base)
    ref = distill(teacher, full, DATA, cfg)

    class Stop(Exception):
        pass

    def stop_at_7(_model):
        raise Stop

    first = copy.deepcopy(base)
    with pytest.raises(Stop):  # dies after step 7; the last checkpoint is step 6
        distill(teacher, first, DATA, DistillConfig(**{**cfg.__dict__, "eval_every": 7}), output_dir=tmp_path,
                evaluate=stop_at_7)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    resumed = copy.deepcopy(base)
    out = distill(teacher, resumed, DATA, cfg, output_dir=tmp_path)
    assert [s for s, _ in out.losses] == [7, 8]  # nothing repeated, nothing skipped
    assert out.losses == ref.losses[6:]
    for (name, a), (_, b) in zip(_linears(full), _linears(resumed)):
        assert torch.equal(a.weight, b.weight), name
    with pytest.raises(ValueError, match="other settings"):
        distill(teacher, copy.deepcopy(base), DATA, DistillConfig(**{**cfg.__dict__, "lr": 1e-4}), output_dir=tmp_path)


def test_drop_layers_makes_a_smaller_student():
    model = tiny_llama(layers=4)
    drop_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    with torch.no_grad():
        assert torch.isfinite(model(DATA[:2]).logits).all()
    with pytest.raises(ValueError, match="keep at least one"):
        drop_layers(model, [0, 1])


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="kind"):
        DistillConfig(kind="topk")
    with pytest.raises(ValueError, match="positive integer"):
        DistillConfig(steps=0)
    teacher, student = tiny_llama(), tiny_llama(vocab=80)
    with pytest.raises(ValueError, match="vocabulary"):
        distill(teacher, student, DATA, FAST)
    with pytest.raises(ValueError, match="multiple of processes"):
        distill(teacher, tiny_llama(), DATA, DistillConfig(batch_size=3, grad_accum=2, quiet=True))
    with pytest.raises(ValueError, match="int64"):
        distill(teacher, tiny_llama(), DATA.float(), FAST)
    export_like = tiny_llama()
    from compressor.runtime.quant_linear import QuantLinear
    from compressor.core.scheme import QuantScheme

    export_like.model.layers[0].mlp.down_proj = QuantLinear(80, 64, QuantScheme(bits=4, group_size=16))
    with pytest.raises(ValueError, match="trainable_from_export"):
        prepare_student(export_like)


def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    """accelerate launch, 2 CPU processes over gloo, global batch 4 = 2 x 2: the same losses as 1 process."""
    from compressor.cli import main
    from tests.helpers import tiny_tokenizer

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    _teacher().save_pretrained(teacher_dir)
    tiny_tokenizer().save_pretrained(teacher_dir)
    (tmp_path / "text.txt").write_text(" ".join(f"w{(i * 7) % 95}" for i in range(4000)), encoding="utf-8")
    student = _compressed([{"prune": {"method": "magnitude", "structure": "2:4"}}])
    student.save_pretrained(student_dir)
    args = ["distill", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(tmp_path / "text.txt"),
            "--samples", "16", "--seq-len", "24", "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "-q"]
    assert main([*args, "-o", str(tmp_path / "one"), "--losses-json", str(tmp_path / "one.json")]) == 0

    proc = launch_two_cpu_processes([*args, "-o", str(tmp_path / "two"), "--losses-json", str(tmp_path / "two.json")],
                                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())["losses"]
    two = json.loads((tmp_path / "two.json").read_text())["losses"]
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4), (one, two)
    assert one[-1][1] < one[0][1]
    from transformers import AutoModelForCausalLM

    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one").model.layers[0].mlp.down_proj.weight
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two").model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(w1, w2, rtol=1e-3, atol=1e-5)
    assert is_nm(w1 != 0, 2, 4)


def test_distill_pass_in_a_recipe_after_pruning_and_quantization(tmp_path):
    teacher = _teacher()
    prune_quant = [{"prune": {"method": "wanda", "structure": "2:4"}}, {"rtn": {"scheme": {"bits": 4, "group_size": 16}}}]
    plain = copy.deepcopy(teacher)
    compress(plain, Recipe.from_dict({"passes": prune_quant}), calibration=DATA, pipeline=QUIET, quiet=True)
    student = copy.deepcopy(teacher)
    recipe = Recipe.from_dict({"passes": [*prune_quant, {"distill": {"steps": 20, "lr": 3e-3, "warmup": 0.0}}]})
    compress(student, recipe, calibration=DATA, pipeline=QUIET, quiet=True, output=tmp_path / "export")
    assert _kl(teacher, student) < 0.8 * _kl(teacher, plain)
    for name, m in _linears(student):
        scheme, qp, g_idx = quant_state(m)
        assert is_nm(prune_mask(m), 2, 4) and not (m.weight[~prune_mask(m)] != 0).any(), name
        assert torch.equal(fake_quant(m.weight, qp, scheme, g_idx), m.weight), name
    from compressor.export.loader import load_compressed

    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "export")(DATA).logits, student(DATA).logits,
                                   rtol=1e-4, atol=1e-4)


def test_distill_pass_must_come_last():
    recipe = Recipe.from_dict({"passes": [{"distill": {"steps": 1}}, {"rtn": {"scheme": {"bits": 4, "group_size": 16}}}]})
    with pytest.raises(ValueError, match="must be the last pass"):
        compress(tiny_llama(), recipe, quiet=True)
    with pytest.raises(ValueError, match="teacher"):
        from compressor.passes.distill import DistillPass, DistillPassConfig

        DistillPass(DistillPassConfig(steps=1)).apply(tiny_llama())


def test_bf16_autocast_and_activation_checkpointing_run():
    teacher = _teacher()
    student = _compressed([{"prune": {"method": "magnitude", "sparsity": 0.5}}])
    result = distill(teacher, student, DATA, DistillConfig(steps=3, batch_size=4, lr=3e-3, mixed_precision="bf16",
                                                          gradient_checkpointing=True, quiet=True))
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert student.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # autocast, weights stay fp32


@pytest.mark.parametrize("first", [{"rtn": {"scheme": {"bits": 3, "group_size": 16, "symmetric": False}}},
                                   {"prune": {"method": "magnitude", "structure": "2:4"}}], ids=["rtn-w3", "prune-2:4"])
def test_blockwise_distillation_brings_blocks_back_and_keeps_compression(first):
    teacher = _teacher()
    plain = _compressed([first])
    tuned = _compressed([first, {"distill_blocks": {"iters": 30, "lr": 1e-3, "batch_size": 4}}])
    assert _kl(teacher, tuned) < 0.8 * _kl(teacher, plain)
    for name, m in _linears(tuned):
        if "rtn" in first:
            scheme, qp, g_idx = quant_state(m)
            assert torch.equal(fake_quant(m.weight, qp, scheme, g_idx), m.weight), name
        else:
            assert is_nm(prune_mask(m), 2, 4) and not (m.weight[~prune_mask(m)] != 0).any(), name
