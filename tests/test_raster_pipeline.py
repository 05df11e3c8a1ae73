"""``LlamaGenPipeline``: the official fixtures through the user-facing object, native folders (save / load / strict
errors), per-image determinism, both tokenizer kinds (official VQ and nextscale's single-scale VQ-VAE), row previews
and the speculative wiring.

Tolerances as tests/test_llamagen_official.py (fixtures README): tokens exact, images 1e-4.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from nextscale import LlamaGenPipeline
from nextscale.accel.base import Resolved
from nextscale.engine.raster.sampler import RasterResult, sample_raster
from nextscale.errors import CheckpointError, InvalidInputError
from nextscale.models.native_raster import load_raster_native
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.pipelines import raster as raster_pipeline
from nextscale.pipelines.raster import MSVQTokenizer, make_tokenizer
from nextscale.pipelines.registry import family_of_folder
from nextscale.pipelines.var import VARPipeline

from .conftest import (
    RASTER_GRID,
    single_scale_vae_config,
    tiny_llamagen,
    tiny_pair,
    tiny_raster_pipe,
    tiny_vae_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen-official"
GPT_FILE, VQ_FILE = FIXTURES / "c2i_tiny_256.pt", FIXTURES / "vq_ds16_c2i_tiny.pt"
IMAGE_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> LlamaGenPipeline:
    if not GPT_FILE.is_file():
        pytest.fail(f"llamagen-official fixtures missing under {FIXTURES}")
    return LlamaGenPipeline.from_official(GPT_FILE, VQ_FILE, n_head=2)  # head dim 16: in no tensor shape


def load(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / name))


def unit(x: np.ndarray) -> np.ndarray:
    """The fixtures' unclamped decoder output -> what the pipeline returns: clamp to [-1, 1], then [0, 1]."""
    return (np.clip(x, -1, 1) + 1) / 2


# ---- the official fixtures through the pipeline --------------------------------------------------------------------
def test_from_official_reproduces_the_greedy_fixture_tokens_and_images(pipe):
    ref = load("gpt_sample_greedy.npz")
    labels = ref["labels"].tolist()
    out = pipe(labels, cfg=float(ref["cfg_scale"]), top_k=1, seed=0, rng="official", output_type="pt")
    np.testing.assert_array_equal(out.tokens.numpy(), ref["tokens"])
    assert out.tokens.dtype == torch.long and out.labels == labels
    assert out.images.shape == (2, 3, 256, 256) and out.images.dtype == torch.float32
    img = out.images.double().numpy()
    np.testing.assert_allclose(img[..., :16, :16], unit(ref["image_crop_tl"]), atol=IMAGE_TOL)
    np.testing.assert_allclose(img[..., -16:, -16:], unit(ref["image_crop_br"]), atol=IMAGE_TOL)
    assert out.stats["forward_passes"] == 256 and out.stats["guided_steps"] == 256
    # PIL output: the same pixels, rounded as sample_c2i.py's save_image does.
    pil = pipe.decode_tokens(out.tokens, "pil")
    ref_u8 = np.clip(unit(ref["image_crop_tl"]) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got_u8 = np.stack([np.asarray(im)[:16, :16] for im in pil])
    assert np.abs(got_u8.astype(int) - ref_u8.astype(int)).max() <= 1


def test_settings_reach_the_sampler_as_in_sample_c2i(pipe):
    var = load("gpt_sample_greedy_variants.npz")
    labels = [207, 360]
    out = pipe(
        labels, cfg=4.0, cfg_interval=float(var["cfg_interval_run_cfg_interval"]), top_k=1, seed=0, rng="official"
    )
    np.testing.assert_array_equal(out.tokens.numpy(), var["cfg_interval_run_tokens"])
    out = pipe(labels, cfg=1.0, top_k=1, seed=0, rng="official", output_type="latent")
    np.testing.assert_array_equal(out.tokens.numpy(), var["nocfg_run_tokens"])
    assert out.images is None and out.stats["guided_steps"] == 0
    ref = load("gpt_sample_topk_torchrng.npz")
    out = pipe(labels, cfg=2.0, top_k=1000, seed=int(ref["seed"]), rng="official", output_type="latent")
    np.testing.assert_array_equal(out.tokens.numpy(), ref["tokens"])


def test_decode_tokens_matches_the_official_decoder(pipe):
    ref = load("vq_decode.npz")
    images = pipe.decode_tokens(torch.from_numpy(ref["indices"]), "pt")
    np.testing.assert_allclose(images.double().numpy(), unit(ref["image"]), atol=IMAGE_TOL)


def test_image_i_is_the_same_alone_and_in_a_batch(pipe):
    both = pipe([207, 360, 1], seed=11, output_type="pt", top_k=50)
    alone = pipe([360], seed=11, image_indices=[1], output_type="pt", top_k=50)
    torch.testing.assert_close(alone.tokens[0], both.tokens[1], rtol=0, atol=0)
    torch.testing.assert_close(alone.images[0], both.images[1], rtol=0, atol=1e-5)
    assert not torch.equal(both.tokens[0], both.tokens[1])
    shard = pipe(["1"], seed=11, first_image_index=2, output_type="latent", top_k=50)
    assert torch.equal(shard.tokens[0], both.tokens[2])


# ---- native folders ----------------------------------------------------------------------------------------------
def test_save_and_load_round_trip_gives_identical_tokens(pipe, tmp_path):
    names = [f"class {i}" for i in range(1000)]
    src = LlamaGenPipeline(pipe.transformer, pipe.tokenizer, sampling_defaults={"top_k": 100}, class_names=names)
    folder = src.save_pretrained(tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LlamaGenPipeline" and index["vae"] == ["nextscale", "VQModel"]
    assert index["sampling_defaults"] == {"top_k": 100} and index["class_names"][:2] == ["class 0", "class 1"]
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert (cfg["_class_name"], cfg["n_head"], cfg["image_size"]) == ("LlamaGen", 2, 256)  # nothing to re-infer
    assert family_of_folder(folder) == "raster"

    back = LlamaGenPipeline.from_pretrained(folder)
    assert back.sampling_defaults["top_k"] == 100 and back.class_names == tuple(names)
    assert back.transformer.cfg == pipe.transformer.cfg and back.tokenizer.kind == "VQModel"
    a = src(["class 207", 360], seed=3, output_type="pt")  # names resolve like VARPipeline's
    b = back([207, "class 360"], seed=3, output_type="pt")
    assert torch.equal(a.tokens, b.tokens) and a.params == b.params and a.params.top_k == 100
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_hub_ids_resolve_like_var(pipe, tmp_path, monkeypatch):
    import huggingface_hub

    folder = pipe.save_pretrained(tmp_path / "snapshot")
    asked: list[str] = []

    def fake_download(repo_id: str, **kw):
        asked.append(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    back = LlamaGenPipeline.from_pretrained("someorg/llamagen-tiny")
    assert asked == ["someorg/llamagen-tiny"] and back.transformer.cfg == pipe.transformer.cfg


def one_line(fn, *a, **kw) -> str:
    with pytest.raises((CheckpointError, InvalidInputError)) as err:
        fn(*a, **kw)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_wrong_or_missing_components_are_named(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "m")
    var_folder = VARPipeline(*tiny_pair(0)).save_pretrained(tmp_path / "var")
    assert "expected 'LlamaGenPipeline'" in one_line(LlamaGenPipeline.from_pretrained, var_folder)
    assert "expected 'VARPipeline'" in one_line(VARPipeline.from_pretrained, folder)  # VAR's loader is unchanged

    cfg_path = folder / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "VQVAE"}))
    assert "_class_name is 'VQVAE', but model_index.json declares 'VQModel'" in one_line(load_raster_native, folder)
    cfg_path.write_text(json.dumps({**cfg, "codebook_size": 512}))  # config and weights disagree: strict load
    assert "vae/model.safetensors: does not match the inferred model" in one_line(load_raster_native, folder)
    cfg_path.write_text(json.dumps(cfg))
    gpt_path = folder / "transformer" / "config.json"
    gpt_cfg = json.loads(gpt_path.read_text())
    gpt_path.write_text(json.dumps({**gpt_cfg, "downsample": 8}))  # no weight depends on it: the pair check sees it
    assert "the GPT expects a downsample-8 tokenizer, this one downsamples by 16" in one_line(
        load_raster_native, folder
    )
    gpt_path.write_text(json.dumps({**gpt_cfg, "n_head": 3}))
    assert "transformer/config.json: dim 32 is not divisible by n_head 3" in one_line(load_raster_native, folder)
    gpt_path.write_text(json.dumps(gpt_cfg))
    (folder / "vae" / "model.safetensors").unlink()
    assert "vae/model.safetensors: missing" in one_line(load_raster_native, folder)

    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["nextscale", "VAE"]}))
    assert "component 'vae' is ['nextscale', 'VAE']" in one_line(load_raster_native, folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "Other"}))
    known = "a model folder holds one of InfinityPipeline, LlamaGenPipeline, VARPipeline"
    assert known in one_line(family_of_folder, folder)


# ---- nextscale's own VQ-VAE as the tokenizer ------------------------------------------------------------------
@pytest.fixture(scope="module")
def msvq_pipe() -> LlamaGenPipeline:
    return tiny_raster_pipe()


def test_a_single_scale_vqvae_is_a_raster_tokenizer(msvq_pipe):
    p = msvq_pipe
    assert isinstance(p.tokenizer, MSVQTokenizer) and p.tokenizer.kind == "VQVAE"
    assert (p.tokenizer.grid, p.tokenizer.vocab_size, p.image_size, p.seq_len) == (RASTER_GRID, 64, 8, RASTER_GRID**2)
    out = p([0, 3, 9], seed=1, output_type="pt")
    assert out.tokens.shape == (3, 16) and out.images.shape == (3, 3, 8, 8)
    assert out.images.min() >= 0 and out.images.max() <= 1
    # The adapter decodes exactly as the VQ-VAE itself decodes its one token map.
    expected = p.vae.idx_to_img([out.tokens]).add(1).mul(0.5)
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-6)
    # And it tokenizes: re-encoding decoded images gives tokens of the right shape and range.
    tok = p.encode(p.tokenizer.decode_tokens(out.tokens))
    assert tok.shape == (3, 16) and int(tok.max()) < 64
    assert len(p.decode_tokens(out.tokens)) == 3  # PIL


def test_tokenizer_mismatches_are_one_line_errors():
    gpt = tiny_llamagen(4, vocab_size=64, image_size=8, downsample=2)
    multi = VQVAE(tiny_vae_config(patch_nums=(1, 2, 4)))
    assert "needs a single scale, patch_nums=(4,)" in one_line(make_tokenizer, multi, gpt.cfg)
    assert "the GPT predicts 64 codes, the VQ-VAE has 32" in one_line(
        make_tokenizer, VQVAE(single_scale_vae_config(vocab_size=32)), gpt.cfg
    )
    wrong_grid = VQVAE(single_scale_vae_config(grid=3))
    assert "the GPT samples a 4x4 token grid at downsample 2 (8 px)" in one_line(make_tokenizer, wrong_grid, gpt.cfg)
    assert "cannot tokenize for a raster model" in one_line(make_tokenizer, torch.nn.Linear(2, 2), gpt.cfg)


def test_a_msvq_raster_folder_round_trips(msvq_pipe, tmp_path):
    folder = msvq_pipe.save_pretrained(tmp_path / "m")
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["nextscale", "VQVAE"]
    back = LlamaGenPipeline.from_pretrained(folder)
    a, b = msvq_pipe([1, 2], seed=4, output_type="pt"), back([1, 2], seed=4, output_type="pt")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)


# ---- previews, options, speculative ----------------------------------------------------------------------------
def test_row_previews(msvq_pipe):
    seen: list[tuple[int, torch.Tensor]] = []
    out = msvq_pipe([2, 5], seed=7, output_type="pt", callback_on_rows=lambda r, x: seen.append((r, x)))
    assert [r for r, _ in seen] == [1, 2, 3, 4]
    assert all(x.shape == (2, 3, 8, 8) for _, x in seen)
    torch.testing.assert_close(seen[-1][1], out.images, rtol=0, atol=0)  # all rows done: the image itself
    # After row 1 the other rows still hold the tokenizer's mean code: a flat preview, not the final image.
    tok = msvq_pipe.tokenizer
    codes = tok.embed(out.tokens)
    codes[:, :, 1:] = tok.mean_code()[None, :, None, None]
    torch.testing.assert_close(seen[0][1], tok.decode_codes(codes).add(1).mul(0.5), rtol=0, atol=0)
    assert not torch.equal(seen[0][1], out.images)

    toks: list[tuple[int, torch.Tensor]] = []
    out = msvq_pipe(
        [2, 5], seed=7, output_type="latent", callback_every=2, callback_on_rows=lambda r, x: toks.append((r, x))
    )
    assert [r for r, _ in toks] == [2, 4]
    assert torch.equal(toks[0][1], out.tokens[:, : 2 * RASTER_GRID]) and torch.equal(toks[1][1], out.tokens)


def test_bad_arguments_are_one_line_errors(msvq_pipe):
    p = msvq_pipe
    assert "output_type must be" in one_line(p, [0], seed=0, output_type="gif")
    assert "class 10 is out of range" in one_line(p, [10], seed=0)
    assert "temperature must be >= 0" in one_line(p, [0], seed=0, temperature=-1.0)
    assert "callback_every must be an int >= 1" in one_line(p, [0], seed=0, callback_every=0)
    assert "image_indices has 1 entries for 2 images" in one_line(p, [0, 1], seed=0, image_indices=[3])
    assert "unknown sampling_defaults ['more_smooth']" in one_line(
        LlamaGenPipeline, p.transformer, p.tokenizer, sampling_defaults={"more_smooth": True}
    )
    assert "3 class names given for a model of 10 classes" in one_line(p.set_class_names, ["a", "b", "c"])


def test_speculative_is_wired_to_the_speculative_loop(msvq_pipe, monkeypatch):
    """The pipeline's side of the contract: parse_speculative(spec) -> .window / .rule(model), then
    sample_speculative(model, labels, params, rule, window, generators, on_step) -> RasterResult."""
    calls: dict = {}

    class Rule:
        draft_init = "random"

    the_rule = Rule()

    class Config:
        window, zipar = 3, 0

        def rule(self, model, codebook_VD):
            calls["rule_model"], calls["codebook"] = model, codebook_VD
            return the_rule

    def parse_speculative(spec):
        calls["spec"] = spec
        return Config()

    def sample_speculative(model, labels_B, params, rule, window, generators=None, on_step=None, zipar=0):
        calls["args"] = (model, labels_B.tolist(), params.top_k, rule, window, zipar)
        res = sample_raster(model, labels_B, params, generators, on_step)
        return RasterResult(res.tokens_BL, {"forward_passes": 7.5, "mean_accepted": 2.1})

    accel_mod = types.ModuleType("nextscale.accel.speculative")
    accel_mod.parse_speculative = parse_speculative  # type: ignore[attr-defined]
    accel_mod.describe = lambda spec, presets: Resolved(spec, (spec,), "as given")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nextscale.accel.speculative", accel_mod)
    monkeypatch.setattr(raster_pipeline, "sample_speculative", sample_speculative)

    p = msvq_pipe
    out = p([1, 2], seed=0, top_k=5, speculative="sjd:window=3", output_type="latent")
    exact = p([1, 2], seed=0, top_k=5, output_type="latent")
    assert calls["spec"] == "sjd:window=3" and calls["rule_model"] is p.transformer
    assert torch.equal(calls["codebook"], p.tokenizer.codebook()), "latent proximity from the tokenizer's codes"
    assert calls["args"] == (p.transformer, [1, 2], 5, the_rule, 3, 0)
    assert torch.equal(out.tokens, exact.tokens)
    assert out.stats["forward_passes"] == 7.5 and out.stats["mean_accepted"] == 2.1
    assert out.stats["speculative"] == "sjd:window=3"
    assert "speculative needs 'fast'" in one_line(p, [1], seed=0, speculative="sjd", sampler="reference")


def test_a_models_speculative_presets_are_saved_and_take_precedence(msvq_pipe, tmp_path):
    p = msvq_pipe
    tuned = LlamaGenPipeline(p.transformer, p.vae, speculative_presets={"fast": "lantern:window=4,delta=0.2,k=9"})
    loaded = LlamaGenPipeline.from_pretrained(tuned.save_pretrained(tmp_path / "m"))
    assert loaded.speculative_presets == {"fast": "lantern:window=4,delta=0.2,k=9"}
    out = loaded([1], seed=0, speculative="fast", output_type="latent")
    assert out.stats["speculative"] == "lantern:window=4,delta=0.2,k=9"
    tuned_fast = {"requested": "fast", "specs": ["lantern:window=4,delta=0.2,k=9"], "source": "model's tuned preset"}
    assert out.stats["resolved"] == tuned_fast == loaded.describe_accel("fast").as_dict()
    assert str(p.describe_accel(" Fast ")) == "fast -> sjd-pac:window=32 (built-in preset)"
    assert str(p.describe_accel("sjd:window=3")) == "sjd:window=3 -> sjd:window=3 (as given)"
    exact = p([1], seed=0, output_type="latent").stats["resolved"]
    assert exact == {"requested": "exact", "specs": [], "source": "default"}
    want = p([1], seed=0, speculative="lantern:window=4,delta=0.2,k=9", output_type="latent")
    assert torch.equal(out.tokens, want.tokens)
    assert p([1], seed=0, speculative="fast", output_type="latent").stats["speculative"] == "sjd-pac:window=32"
    with pytest.raises(InvalidInputError, match="unknown speculative method 'nope'"):
        LlamaGenPipeline(p.transformer, p.vae, speculative_presets={"fast": "nope"})


def test_speculative_decoding_through_the_pipeline(pipe, msvq_pipe):
    """The real loop (nextscale.engine.raster.speculative): greedy SJD keeps exactly the greedy tokens of the fixture (a
    random-weight model gives Jacobi guesses little to agree on, so no speed-up is asserted); images stay
    batch-independent; row previews follow the tokens it fixes."""
    ref = load("gpt_sample_greedy.npz")
    out = pipe(ref["labels"].tolist(), cfg=4.0, top_k=1, seed=0, speculative="sjd:window=8", output_type="latent")
    np.testing.assert_array_equal(out.tokens.numpy(), ref["tokens"])
    assert out.stats["forward_passes"] <= 256 and out.stats["mean_accepted"] >= 1
    assert out.stats["speculative"] == "sjd:window=8"

    p = msvq_pipe
    seen: list[int] = []
    spec = "sjd:window=3"
    both = p([1, 2, 3], seed=9, speculative=spec, output_type="pt", callback_on_rows=lambda r, x: seen.append(r))
    alone = p([2], seed=9, image_indices=[1], speculative=spec, output_type="pt")
    assert torch.equal(alone.tokens[0], both.tokens[1]) and seen == [1, 2, 3, 4]
    assert "unknown speculative method 'nope'" in one_line(p, [1], seed=0, speculative="nope")
