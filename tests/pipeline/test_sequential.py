"""Sequential pipeline: captured inputs, statistics, cache locations, checkpoint resume."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_llama

from compressor import Recipe, compress, save_compressed
from compressor.core.arch import find_blocks
from compressor.pipeline.sequential import PipelineConfig, run_sequential
from compressor.passes import gptq as gptq_mod

IDS = torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(0))
GPTQ = {"passes": [{"gptq": {"scheme": {"bits": 3, "group_size": 16}}}]}


def _run(recipe=GPTQ, layers=3, **pipeline):
    model = tiny_llama(layers=layers)
    compress(model, Recipe.from_dict(recipe), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True, **pipeline))
    return model


def _weights(model):
    return {k: v for k, v in model.state_dict().items()}


def test_find_blocks():
    name, blocks = find_blocks(tiny_llama(layers=3))
    assert name == "model.layers" and len(blocks) == 3


def test_first_block_hessian_matches_a_manual_forward(monkeypatch):
    seen = {}
    real = gptq_mod.gptq_quantize

    def spy(weight, hessian, *a, **k):
        seen.setdefault(weight.data_ptr(), hessian.clone())
        return real(weight, hessian, *a, **k)

    fp = tiny_llama(layers=3)
    q_proj = fp.model.layers[0].self_attn.q_proj
    xs = []
    h = q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        fp(IDS)
    h.remove()
    x = torch.cat(xs)
    expected = 2 * x.t() @ x / x.shape[0]
    model = tiny_llama(layers=3)
    ptr = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
    compress(model, Recipe.from_dict(GPTQ), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    torch.testing.assert_close(seen[ptr], expected, rtol=1e-4, atol=1e-5)


def test_gptq_beats_rtn_on_the_model():
    fp = tiny_llama(layers=3)
    with torch.no_grad():
        ref = fp(IDS).logits
        err = lambda m: (m(IDS).logits - ref).pow(2).mean().item()  # noqa: E731
        rtn = tiny_llama(layers=3)
        compress(rtn, Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 3, "group_size": 16}}}]}))
        assert err(_run()) < 0.7 * err(rtn)


@pytest.mark.parametrize("cache", ["cpu", "disk"])
def test_cache_locations_agree(cache, tmp_path):
    base = _weights(_run())
    other = _weights(_run(cache=cache, cache_dir=tmp_path / "acts" if cache == "disk" else None))
    assert all(torch.equal(base[k], other[k]) for k in base)


@pytest.mark.parametrize("asymmetric", [False, True], ids=["gptq", "gptaq"])
def test_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch, asymmetric):
    """Also with the full-precision stream (GPTAQ): a resumed block still advances it."""
    recipe = {"passes": [{"gptq": {**GPTQ["passes"][0]["gptq"], "asymmetric": asymmetric}}]}
    full = _run(recipe)
    ref_dir = save_compressed(full, tmp_path / "ref")
    ckpt = tmp_path / "ckpt"
    real_end = gptq_mod.GPTQPass.end_block
    calls = {"n": 0}

    def crash_on_block_1(self, block, prefix, **kw):
        if prefix.endswith(".1"):
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_end(self, block, prefix, **kw)

    monkeypatch.setattr(gptq_mod.GPTQPass, "end_block", crash_on_block_1)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, checkpoint_dir=ckpt)
    assert (ckpt / "block_00000.safetensors").is_file() and not (ckpt / "block_00001.safetensors").exists()
    monkeypatch.setattr(gptq_mod.GPTQPass, "end_block", real_end)
    done = []
    monkeypatch.setattr(gptq_mod.GPTQPass, "begin_block", lambda self, b, p, _r=gptq_mod.GPTQPass.begin_block: (done.append(p), _r(self, b, p))[1])
    resumed = _run(recipe, checkpoint_dir=ckpt)
    assert done == ["model.layers.1", "model.layers.2"]  # block 0 came from the checkpoint
    out = save_compressed(resumed, tmp_path / "resumed")
    assert (out / "model.safetensors").read_bytes() == (ref_dir / "model.safetensors").read_bytes()


def test_checkpoint_of_another_run_is_refused(tmp_path):
    _run(checkpoint_dir=tmp_path / "ckpt")
    other = {"passes": [{"gptq": {"scheme": {"bits": 4, "group_size": 16}}}]}
    with pytest.raises(ValueError, match="different run"):
        _run(recipe=other, checkpoint_dir=tmp_path / "ckpt")


def test_rtn_through_the_pipeline_equals_direct_rtn():
    recipe = {"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 16}}}]}
    direct = tiny_llama(layers=3)
    compress(direct, Recipe.from_dict(recipe))
    piped = tiny_llama(layers=3)
    passes = Recipe.from_dict(recipe).build()
    run_sequential(piped, passes, IDS, PipelineConfig(quiet=True))
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), piped.state_dict().values()))


def test_calibration_errors():
    with pytest.raises(ValueError, match="need calibration data"):
        compress(tiny_llama(), Recipe.from_dict(GPTQ))
    with pytest.raises(ValueError, match="outside the decoder blocks"):
        compress(tiny_llama(), Recipe.from_dict({"passes": [{"gptq": {"ignore": []}}]}), calibration=IDS)
    with pytest.raises(ValueError, match="reads token ids"):
        compress(tiny_llama(), Recipe.from_dict(GPTQ), calibration=IDS.float())
    with pytest.raises(ValueError, match="int64"):
        compress(tiny_llama(), Recipe.from_dict(GPTQ), calibration=IDS[0])


def test_linears_with_the_same_input_share_one_hessian(monkeypatch):
    seen = {}
    real = gptq_mod.gptq_quantize

    def spy(weight, hessian, *a, **k):
        seen[weight.shape] = seen.get(weight.shape, []) + [hessian]
        return real(weight, hessian, *a, **k)

    monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
    model = tiny_llama(layers=1)
    compress(model, Recipe.from_dict(GPTQ), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    k_h, v_h = seen[(32, 64)]  # k_proj and v_proj (2 kv heads x 16)
    gate_h, up_h = seen[(80, 64)]
    assert k_h is v_h and gate_h is up_h


@pytest.mark.parametrize("recipe", [GPTQ, {"passes": [{"adaround": {"scheme": {"bits": 3, "group_size": 16}, "iters": 2,
                                                                  "granularity": "block", "batch_size": 24}}]}],
                         ids=["gptq", "adaround-block"])
def test_compute_device_holds_one_block_at_a_time(monkeypatch, recipe):
    """Every block forward (statistics, compression, propagation) sees only its own block onloaded."""
    from compressor.pipeline import sequential

    model = tiny_llama(layers=8)
    _, blocks = find_blocks(model)
    resident: list[int] = []
    onloads: list[int] = []
    real_on, real_off = sequential._onload, sequential._offload

    def onload(block, device):
        resident.append(id(block))
        onloads.append(id(block))
        return real_on(block, device)

    def offload(block, home):
        resident.remove(id(block))
        real_off(block, home)

    def check(block, *_args, **_kwargs):
        assert resident == [id(block)], "a block ran while another block was also on the compute device"

    monkeypatch.setattr(sequential, "_onload", onload)
    monkeypatch.setattr(sequential, "_offload", offload)
    for b in blocks:
        b.register_forward_hook(check)  # after the forward: the capture's stopped call does not count
    model.lm_head.register_forward_pre_hook(lambda *_: pytest.fail("lm_head ran during calibration"))
    compress(model, Recipe.from_dict(recipe), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    assert onloads == [id(b) for b in blocks] and resident == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_device_memory_grows_with_one_block_not_the_model():
    """Model on CPU, compute on CUDA: the peak allocation is the same for 2 and 12 blocks."""
    def peak(layers):
        model = tiny_llama(hidden=256, inter=704, layers=layers)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        compress(model, Recipe.from_dict(GPTQ), calibration=IDS,
                 pipeline=PipelineConfig(device="cuda", batch_size=5, quiet=True))
        block_bytes = sum(p.numel() * p.element_size() for p in find_blocks(model)[1][0].parameters())
        return torch.cuda.max_memory_allocated() - base, block_bytes

    small, block = peak(2)
    large, _ = peak(12)
    assert large - small < 0.25 * block, (small, large, block)


def test_calibration_forwards_stop_after_the_last_observed_layer(monkeypatch):
    """Stopping each forward once down_proj's input is recorded changes no statistic, only the cost."""
    from compressor.pipeline import sequential

    full = tiny_llama(layers=3)
    real = sequential._calibration_forwards
    monkeypatch.setattr(sequential, "_calibration_forwards", lambda block, cache, observed, **kw: real(block, cache, None, **kw))
    compress(full, Recipe.from_dict(GPTQ), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    monkeypatch.setattr(sequential, "_calibration_forwards", real)

    model = tiny_llama(layers=3)
    ran = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda *_: ran.append(1))
    compress(model, Recipe.from_dict(GPTQ), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    a, b = _weights(full), _weights(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # per block: 1 full calibration forward (of 3 batches) + 3 propagation forwards
    assert len(ran) == 3 * (1 + 3)


def test_asymmetric_gptq_through_the_pipeline_tracks_the_fp_model():
    """GPTAQ pairs each batch's fp and compressed inputs; on held-out tokens it beats plain GPTQ."""
    test_ids = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(layers=4)(test_ids).logits
    err = {}
    for asym in (False, True):
        model = tiny_llama(layers=4)
        recipe = {"passes": [{"gptq": {"scheme": {"bits": 3, "group_size": 16}, "asymmetric": asym}}]}
        compress(model, Recipe.from_dict(recipe), calibration=calib, pipeline=PipelineConfig(batch_size=4, quiet=True))
        with torch.no_grad():
            err[asym] = (model(test_ids).logits - ref).pow(2).mean().item()
    assert err[True] < 0.95 * err[False], err  # measured: 0.86x


def test_stages_follow_the_forward_and_group_linears_reading_one_input():
    from compressor.pipeline.sequential import _stages, capture_block_inputs
    from compressor.passes.gptq import GPTQConfig, GPTQPass

    model = tiny_llama(layers=1)
    name, blocks = find_blocks(model)
    cache = capture_block_inputs(model, blocks, name, IDS, PipelineConfig(batch_size=5, quiet=True))
    try:
        stages = _stages(blocks[0], "model.layers.0", GPTQPass(GPTQConfig()), cache)
    finally:
        cache.close()
    p = "model.layers.0."
    assert stages == [{p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, {p + "self_attn.o_proj"},
                      {p + "mlp.gate_proj", p + "mlp.up_proj"}, {p + "mlp.down_proj"}]


def test_true_sequential_gptq_changes_only_what_follows_the_first_stage():
    """Block 0's q/k/v see the same inputs either way; o_proj onwards see the quantized stages' outputs."""
    staged = {"passes": [{"gptq": {"scheme": {"bits": 3, "group_size": 16}, "true_sequential": True}}]}
    a, b = _weights(_run(staged, layers=2)), _weights(_run(GPTQ, layers=2))
    for k in a:
        if k.startswith("model.layers.0.self_attn.") and k.split(".")[3] in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["model.layers.0.self_attn.o_proj.weight"], b["model.layers.0.self_attn.o_proj.weight"])
    assert not torch.equal(a["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])


def test_true_sequential_asymmetric_gptq_pairs_the_streams_in_every_stage():
    staged = {"passes": [{"gptq": {"scheme": {"bits": 3, "group_size": 16}, "asymmetric": True, "true_sequential": True}}]}
    plain = {"passes": [{"gptq": {"scheme": {"bits": 3, "group_size": 16}, "asymmetric": True}}]}
    a, b = _weights(_run(staged, layers=2)), _weights(_run(plain, layers=2))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[q], b[q])  # first stage of the first block: same inputs on both streams
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.isfinite(v).all() for v in a.values())


def test_half_precision_blocks_run_their_calibration_forwards_in_float32(monkeypatch):
    """On a CPU, a bfloat16 model's block forwards compute in float32: the Hessian is that of the float32
    forward's inputs, the weights the pass sees and leaves are bfloat16, and every parameter that the pass
    does not touch comes back bit for bit."""
    seen = []
    real = gptq_mod.gptq_quantize

    def spy(weight, hessian, *a, **k):
        seen.append((weight.dtype, hessian.clone()))  # the first call is block 0's q/k/v: one input
        return real(weight, hessian, *a, **k)

    model = tiny_llama(layers=2).to(torch.bfloat16)
    norm = model.model.layers[1].input_layernorm.weight.detach().clone()
    xs = []
    ref = tiny_llama(layers=2).to(torch.bfloat16).float()  # bfloat16 weights, float32 compute
    q_proj = ref.model.layers[0].self_attn.q_proj
    h = q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        # block 0's inputs are the embeddings in bfloat16, widened; everything after runs in float32
        emb = model.model.embed_tokens(IDS).float()
        ref.model.layers[0](emb, position_embeddings=ref.model.rotary_emb(emb, torch.arange(IDS.shape[1])[None]),
                            attention_mask=None)
    h.remove()
    x = torch.cat(xs)
    monkeypatch.setattr(gptq_mod, "gptq_quantize", spy)
    compress(model, Recipe.from_dict(GPTQ), calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    dtype, hessian = seen[0]
    assert {d for d, _ in seen} == {torch.bfloat16}
    torch.testing.assert_close(hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.model.layers[1].input_layernorm.weight, norm)


def test_forward_dtype_model_keeps_the_stored_precision(monkeypatch):
    from compressor.pipeline import sequential

    dtypes = set()
    real = sequential._block_forward

    def spy(block, cache, i):
        dtypes.add(next(block.parameters()).dtype)
        out = real(block, cache, i)
        assert out.dtype == torch.bfloat16  # the cache keeps the model's dtype either way
        return out

    monkeypatch.setattr(sequential, "_block_forward", spy)
    for setting, expected in (("model", {torch.bfloat16}), ("auto", {torch.float32})):
        dtypes.clear()
        model = tiny_llama(layers=2).to(torch.bfloat16)
        compress(model, Recipe.from_dict(GPTQ), calibration=IDS,
                 pipeline=PipelineConfig(batch_size=5, quiet=True, forward_dtype=setting))
        assert dtypes == expected, setting
    with pytest.raises(ValueError, match="forward_dtype"):
        PipelineConfig(forward_dtype="half")


def test_forward_precision_restores_every_tensor_exactly():
    from compressor.pipeline.sequential import _forward_precision

    block = torch.nn.Linear(8, 4).to(torch.bfloat16)
    block.register_buffer("codes", torch.arange(4, dtype=torch.int8))
    block.register_buffer("fp8", torch.ones(4).to(torch.float8_e4m3fn))
    block.register_buffer("f16", torch.randn(4).to(torch.float16))
    before = {k: v.clone() for k, v in block.state_dict().items()}
    weight = block.weight
    with _forward_precision(block, True):
        assert block.weight.dtype == torch.float32 and block.f16.dtype == torch.float32
        assert block.codes.dtype == torch.int8 and block.fp8.dtype == torch.float8_e4m3fn
        assert block.weight is weight  # the same Parameter: hooks holding it see the float32 data
    after = block.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


def _q_proj_inputs(model, calibrate):
    """The inputs block 1's q_proj sees during ``calibrate(model)``, first batch first."""
    seen = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        calibrate(model)
    finally:
        handle.remove()
    return seen


def test_full_precision_propagation_calibrates_every_block_on_the_fp_model_inputs_with_one_forward():
    """propagate='full_precision': block 1 is calibrated on what the uncompressed model feeds it, and each block
    runs one forward per batch (the calibration forward, to the end) instead of two."""
    ref = tiny_llama(layers=3)
    with torch.no_grad():
        fp = torch.cat(_q_proj_inputs(ref, lambda m: [m(IDS[i:i + 5]) for i in range(0, 12, 5)]))

    entries = []

    def run(propagate):
        model = tiny_llama(layers=3)
        counter = model.model.layers[1].register_forward_pre_hook(lambda *_: entries.append(propagate))
        cfg = PipelineConfig(batch_size=5, quiet=True, propagate=propagate)
        seen = _q_proj_inputs(model, lambda m: compress(m, Recipe.from_dict(GPTQ), calibration=IDS, pipeline=cfg))
        counter.remove()
        return model, seen

    model_fp, seen_fp = run("full_precision")
    model_q, seen_q = run("compressed")
    batches = 3  # 12 sequences in batches of 5
    assert entries.count("full_precision") == batches and entries.count("compressed") == 2 * batches
    torch.testing.assert_close(torch.cat(seen_fp[:batches]), fp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.cat(seen_q[:batches]), fp, atol=1e-3)  # block 0 compressed first
    # the same passes ran: every linear of every block is quantized either way, to other weights
    w_fp, w_q = _weights(model_fp), _weights(model_q)
    assert w_fp.keys() == w_q.keys()
    assert torch.equal(w_fp["model.layers.0.self_attn.q_proj.weight"], w_q["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(w_fp["model.layers.2.mlp.down_proj.weight"], w_q["model.layers.2.mlp.down_proj.weight"])


def test_full_precision_propagation_refuses_paired_streams_and_checkpoints(tmp_path):
    asym = {"passes": [{"gptq": {"scheme": {"bits": 3, "group_size": 16}, "asymmetric": True}}]}
    with pytest.raises(ValueError, match="propagate='full_precision' leaves one stream.*asymmetric: false"):
        _run(asym, propagate="full_precision")
    with pytest.raises(ValueError, match="cannot resume from checkpoint_dir"):
        PipelineConfig(propagate="full_precision", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="propagate='sideways': use one of"):
        PipelineConfig(propagate="sideways")


def test_full_precision_propagation_behind_a_calibration_free_pass_takes_the_outputs_up_front():
    """A first pass that changes the block without calibrating: the next inputs are the block's outputs before it."""
    recipe = {"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 16}, "targets": ["o_proj"]}}, *GPTQ["passes"]]}
    ref = tiny_llama(layers=3)
    with torch.no_grad():
        fp = torch.cat(_q_proj_inputs(ref, lambda m: [m(IDS[i:i + 5]) for i in range(0, 12, 5)]))
    cfg = PipelineConfig(batch_size=5, quiet=True, propagate="full_precision")
    seen = _q_proj_inputs(tiny_llama(layers=3), lambda m: compress(m, Recipe.from_dict(recipe), calibration=IDS,
                                                                   pipeline=cfg))
    torch.testing.assert_close(torch.cat(seen[:3]), fp, rtol=1e-5, atol=1e-5)
