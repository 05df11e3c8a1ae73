"""``int8`` plug-in: the quantized copy holds int8 linear weights and leaves the exact model alone, weight bytes
shrink by the expected amount, logits stay close in fp32 and bf16, the pipeline samples valid tokens from the
copy, and spec strings / errors behave like the other plug-ins'."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
from packaging.requirements import Requirement

import nextscale.accel.int8 as int8_mod
from nextscale.accel.base import PlanContext, build_plan, parse_spec, resolve
from nextscale.accel.int8 import Int8, int8_available, is_int8, quantize_int8, weight_bytes
from nextscale.errors import InvalidInputError
from nextscale.models.var import VAR
from nextscale.pipelines.var import VARPipeline

from .conftest import randomize_, tiny_pair, tiny_var_config

needs_torchao = pytest.mark.skipif(
    not int8_available(), reason="torchao is not installed or does not import: pip install 'nextscale[int8]'"
)
PNS = (1, 2, 3, 4)

# Relative error ||logits_int8 - logits|| / ||logits|| allowed. Symmetric per-channel int8 rounds each weight by
# up to scale/2 with scale = max|w_row| / 127; for Gaussian-like rows (max ~3.5 sigma) that is a uniform error of
# ~(3.5 / 127) / sqrt(12) ~ 0.8 % of sigma per weight, so each linear's output is off by ~0.8 % relative, and the
# residual stream + LayerNorms keep it from compounding. Measured on this model (the same at
# ATEN_CPU_CAPABILITY=default, avx2 and avx512): weight-only 0.48 % fp32 / 0.88 % bf16, dynamic 0.63 % / 0.97 %,
# dynamic in the 7-bit range 1.2 % / 1.4 %. The bounds sit ~1.5x above, tight enough to catch int16 saturation in a
# non-VNNI int8 GEMM run without the reduced range (2.4 %: ONEDNN_MAX_CPU_ISA=AVX2 with the range left full) —
# a wrong scale or a skipped layer gives O(1) errors.
REL_TOL = {"weight": 0.015, "dynamic": 0.015, "reduced": 0.02}


@pytest.fixture(scope="module")
def var() -> VAR:
    return randomize_(VAR(tiny_var_config(depth=3, embed_dim=128, num_heads=4, patch_nums=PNS)), 3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def teacher_forced_logits(model: VAR, seed: int = 0) -> torch.Tensor:
    """All scales through ``forward_tokens`` in one call (VAR.forward: block-causal mask), [B, L, V] float32."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 2, 4])
    x = torch.randn(4, model.scales.seq_len - 1, model.Cvae, generator=g)
    with torch.no_grad():
        return model(labels, x)


# ---- without the backend -----------------------------------------------------------------------------------------
def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_dev_extra_installs_a_torchao_that_works():
    """The suite runs with the dev extra (the README's install), so the int8 tests below must run, not skip: the dev
    extra pins the int8 extra's torchao; where the rest of the dev extra is installed, torchao is too; and an
    installed torchao imports with this torch (a torch upgrade past the pin would otherwise turn them into skips)."""
    pins: dict[str, list[Requirement]] = {"dev": [], "int8": []}
    for line in importlib.metadata.requires("nextscale") or []:
        req = Requirement(line)
        for extra, reqs in pins.items():
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                reqs.append(req)
    torchao = {extra: [str(r.specifier) for r in reqs if r.name == "torchao"] for extra, reqs in pins.items()}
    assert torchao["dev"] and torchao["dev"] == torchao["int8"], f"the dev extra must pin the int8 extra's: {torchao}"
    if all(_installed(r.name) for r in pins["dev"] if r.name != "torchao"):
        assert _installed("torchao"), "the dev extra is installed but torchao is not: pip install -e '.[dev]'"
    assert int8_available() == (importlib.util.find_spec("torchao") is not None), "torchao is installed, unusable"


def test_spec_strings_and_one_line_errors():
    m = parse_spec("int8:mode=dynamic")
    assert m == Int8(mode="dynamic") and m.spec() == "int8:mode=dynamic" and parse_spec(m.spec()) == m
    assert parse_spec("int8") == Int8() and Int8().spec() == "int8" and not Int8.lossless
    with pytest.raises(InvalidInputError) as err:
        parse_spec("int8:mode=fast")
    assert str(err.value) == "int8: mode='fast' is not one of: weight, dynamic"
    with pytest.raises(InvalidInputError, match=r"int8: bad option 'bits=4'; .* key in: mode$"):
        parse_spec("int8:bits=4")


def test_missing_backend_names_the_install(monkeypatch, var):
    monkeypatch.setattr(int8_mod, "_torchao", lambda: None)
    assert not int8_available()
    ctx = PlanContext(PNS, depth=3)
    for call in (lambda: build_plan(resolve("int8", ctx), ctx), lambda: quantize_int8(var)):
        with pytest.raises(InvalidInputError) as err:
            call()
        assert "\n" not in str(err.value) and "pip install 'nextscale[int8]'" in str(err.value)


# ---- with torchao ------------------------------------------------------------------------------------------------
@needs_torchao
@pytest.mark.parametrize("mode", ["weight", "dynamic"])
def test_copy_has_int8_linears_and_the_original_is_untouched(var, mode):
    before = {n: (p, p.detach().clone()) for n, p in var.named_parameters()}
    q = Int8(mode=mode).transform(var)
    tokens, adaln = var.linear_roles()
    assert len(tokens) == 4 * var.depth and len(adaln) == var.depth + 1  # + head_nm's AdaLN
    mods = dict(q.named_modules())
    for name in tokens + adaln:
        w = mods[name].weight
        assert is_int8(w) and w.qdata.shape == w.shape and w.scale.numel() == w.shape[0], name  # per channel
        dynamic = w.act_quant_kwargs is not None
        assert dynamic == (mode == "dynamic" and name in tokens), name  # AdaLN stays weight-only
    assert not is_int8(q.head.weight) and q.head.weight.dtype == torch.float32, "the head keeps the model dtype"
    assert not is_int8(q.word_embed.weight)
    # The original: the same parameter objects, same values, still plain float tensors.
    assert {n for n, _ in var.named_parameters()} == set(before)
    for n, p in var.named_parameters():
        assert p is before[n][0] and not is_int8(p) and torch.equal(p, before[n][1]), n
    # The copy shares no storage with the original (a later in-place change to one cannot leak into the other).
    original = {p.data_ptr() for p in var.parameters()}
    assert not [n for n, p in q.named_parameters() if not is_int8(p) and p.data_ptr() in original]


@needs_torchao
def test_weight_bytes_count_int8_data_and_scales(var):
    q = quantize_int8(var)
    fp32 = weight_bytes(var)
    assert fp32 == sum(p.numel() * 4 for p in var.parameters())
    # Every quantized weight: 4 bytes -> 1 byte per entry, plus per output row a float32 scale and an int8 zero
    # point (all zeros: the quantization is symmetric, but torchao stores them).
    mods = dict(var.named_modules())
    lin = [mods[n].weight for names in var.linear_roles() for n in names]
    int8_lin = sum(w.numel() + w.shape[0] * 5 for w in lin)
    assert weight_bytes(q) == fp32 - sum(w.numel() * 4 for w in lin) + int8_lin
    ratio = fp32 / weight_bytes(q)
    print(f"weight bytes fp32/int8 {ratio:.2f} (linears alone {sum(w.numel() * 4 for w in lin) / int8_lin:.2f})")
    assert ratio > 3.3, "the linears hold ~90 % of this model's weights"
    # torchao's own accounting reports the dtype the weight stands for, hence the custom count.
    w = q.blocks[0].ffn.fc1.weight
    assert w.element_size() == 4 and w.qdata.element_size() == 1


@needs_torchao
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["weight", "dynamic"])
def test_logits_stay_close(var, mode, dtype):
    model = var if dtype == torch.float32 else randomize_(VAR(var.cfg), 3).to(dtype)
    exact = teacher_forced_logits(model)
    q = quantize_int8(model, mode)
    got = teacher_forced_logits(q)
    assert got.dtype == torch.float32 and got.shape == exact.shape and torch.isfinite(got).all()
    err = rel_err(got, exact)
    reduced = mode == "dynamic" and q.blocks[0].attn.mat_qkv.weight.reduce_range  # no VNNI: 7-bit range
    print(f"int8 {mode} {dtype}{' (7-bit)' if reduced else ''}: relative logit error {err:.4f}")
    assert 1e-5 < err < REL_TOL["reduced" if reduced else mode], err  # > 0: the int8 weights are the ones used


@needs_torchao
def test_reduced_range_for_cpus_without_vnni(var, monkeypatch):
    """A CPU without VNNI (emulated: torchao's ISA checks patched) gets the 7-bit range torchao prescribes there,
    and the s8 x s8 GEMM path, and stays accurate."""
    import torchao.kernel.intmm
    import torchao.utils

    monkeypatch.setattr(torchao.utils, "should_reduce_range", lambda device: True)
    monkeypatch.setattr(torchao.kernel.intmm, "_cpu_is_vnni_supported", lambda: False)
    q = quantize_int8(var, "dynamic")
    w = q.blocks[0].attn.mat_qkv.weight
    assert w.reduce_range and w.act_quant_kwargs.reduce_range and int(w.qdata.abs().max()) <= 64
    assert rel_err(teacher_forced_logits(q), teacher_forced_logits(var)) < REL_TOL["reduced"]


@needs_torchao
def test_int8_changes_no_plan(var):
    ctx = PlanContext(PNS, depth=3)
    alone = build_plan(resolve("cfg-cutoff:last=1", ctx), ctx)
    both = build_plan(resolve(["int8:mode=dynamic", "cfg-cutoff:last=1"], ctx), ctx)
    assert both.steps == alone.steps and "int8:mode=dynamic" in both.names


@needs_torchao
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pipeline_samples_valid_tokens_from_the_copy(dtype):
    var, vae = tiny_pair(4, dict(depth=3), dict(patch_nums=PNS))
    exact = VARPipeline(var, vae, channels_last_decoder=False, dtype=dtype)
    kw = dict(seed=5, cfg=2.0, top_k=1, output_type="pt")
    ref = exact([0, 3, 4], **kw)
    # Quantized after the pipeline cast the model (bf16: the copy keeps bf16 activations with int8 weights).
    pipe = VARPipeline(quantize_int8(exact.transformer), exact.vae, channels_last_decoder=False, dtype=dtype)
    out = pipe([0, 3, 4], **kw)
    assert [t.shape for t in out.tokens] == [(3, p * p) for p in PNS]
    for t in out.tokens:
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < var.V
    assert out.images.shape == ref.images.shape and torch.isfinite(out.images).all()
    # Greedy sampling: the int8 copy picks the exact model's tokens except near ties.
    agree = torch.cat([(a == b).flatten() for a, b in zip(out.tokens, ref.tokens)]).float().mean()
    print(f"{dtype}: greedy token agreement with the exact model {float(agree):.3f}")
    assert agree > 0.8


@needs_torchao
def test_accel_int8_runs_a_cached_quantized_copy_in_the_pipeline_and_is_server_wide():
    from nextscale.errors import ConfigError
    from nextscale.serve.config import quality_plans

    var, vae = tiny_pair(4, dict(depth=3), dict(patch_nums=PNS))
    pipe = VARPipeline(var, vae, channels_last_decoder=False)
    kw = dict(seed=5, cfg=2.0, top_k=1, output_type="pt")
    direct = VARPipeline(quantize_int8(var), vae, channels_last_decoder=False)([0, 3, 4], **kw)
    out = pipe([0, 3, 4], accel="int8", **kw)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, direct.tokens)), "the plan runs on the int8 copy"
    assert out.stats["accel"] == ["int8"]
    copy = pipe.transformer_for("int8")
    assert copy is pipe.transformer_for(["int8", "cfg-cutoff"]) and copy is not pipe.transformer, "made once"
    assert not any(is_int8(p) for p in pipe.transformer.parameters()), "exact requests keep the exact model"
    assert pipe.transformer_for("exact") is pipe.transformer
    pipe.to(dtype=torch.float32)
    assert pipe.transformer_for("int8") is not copy, "a new dtype/device remakes the copy"
    # one engine runs one transformer: a quality preset that would need int8 requires it server-wide
    pipe.accel_presets = {"fast": ["int8", "cfg-cutoff"]}
    with pytest.raises(ConfigError, match=r"quality 'low' .* runs a transformed model"):
        quality_plans(pipe, "balanced")
    assert quality_plans(pipe, "int8")["low"].plan is not None
