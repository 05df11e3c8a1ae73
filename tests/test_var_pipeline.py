"""``VARPipeline`` on tiny random models: output types, class names, seeds, batch independence, previews, saved
folders, bf16, grey models and editing (keep maps, masks)."""

import numpy as np
import pytest
import torch
from PIL import Image

from nextscale.editing import box_mask, keep_maps
from nextscale.errors import InvalidInputError
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair

NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")


@pytest.fixture
def pipe():
    var, vae = tiny_pair(1, dict(class_names=NAMES))
    return VARPipeline(var, vae)


def test_output_types(pipe):
    size = pipe.image_size
    pil = pipe([0, 1], seed=0)
    assert len(pil.images) == 2 and pil.images[0].size == (size, size) and pil.images[0].mode == "RGB"
    arr = pipe([0, 1], seed=0, output_type="np").images
    assert arr.shape == (2, size, size, 3) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    pt = pipe([0, 1], seed=0, output_type="pt")
    assert pt.images.shape == (2, 3, size, size)
    np.testing.assert_allclose(pt.images.permute(0, 2, 3, 1).numpy(), arr)
    np.testing.assert_array_equal(np.asarray(pil.images[1]), (arr[1] * 255 + 0.5).astype(np.uint8))
    lat = pipe([0], seed=0, output_type="latent").images
    assert lat.shape == (1, 8, 4, 4)
    assert [t.shape for t in pt.tokens] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    with pytest.raises(InvalidInputError, match="output_type"):
        pipe([0], output_type="jpeg")


def test_class_names_and_indices(pipe):
    assert pipe([0, "trouser", "T_SHIRT/TOP", "-1", -1], seed=0).labels == [0, 1, 0, 5, 5]
    with pytest.raises(InvalidInputError, match="unknown class 'sneaker'; allowed: 'T-shirt/top'"):
        pipe(["sneaker"])
    with pytest.raises(InvalidInputError, match=r"class 5 is out of range: allowed 0..4"):
        pipe([5])
    with pytest.raises(InvalidInputError, match="no class labels"):
        pipe([])
    out = pipe(["dress", "coat"], num_images_per_label=3, seed=1)
    assert out.labels == [3, 3, 3, 4, 4, 4]


def test_seed_reproducibility_and_random_seed(pipe):
    a = pipe([2, 3], seed=5, top_k=10, output_type="pt")
    b = pipe([2, 3], seed=5, top_k=10, output_type="pt")
    assert torch.equal(a.images, b.images)
    c = pipe([2, 3], seed=None, top_k=10, output_type="pt")
    d = pipe([2, 3], seed=c.seed, top_k=10, output_type="pt")
    assert torch.equal(c.images, d.images)


def test_image_in_a_batch_equals_the_same_image_alone(pipe):
    labels = [0, 1, 2, 3, 4, 2]
    batch = pipe(labels, seed=3, cfg=2.0, top_k=20, output_type="pt")
    for i in (0, 3, 5):
        alone = pipe([labels[i]], seed=3, cfg=2.0, top_k=20, output_type="pt", first_image_index=i)
        assert all(torch.equal(t[i], u[0]) for t, u in zip(batch.tokens, alone.tokens))
        torch.testing.assert_close(batch.images[i], alone.images[0], atol=1e-4, rtol=0)


def test_reference_sampler_through_the_pipeline(pipe):
    a = pipe([1, 4], seed=2, cfg=3.0, top_p=0.9, output_type="pt")
    b = pipe([1, 4], seed=2, cfg=3.0, top_p=0.9, output_type="pt", sampler="reference")
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_callback_previews_go_coarse_to_fine(pipe):
    previews = []
    out = pipe(
        [1], seed=0, output_type="pt", callback_on_scale=lambda p: previews.append((p.scale_index, p.to_images("pt")))
    )
    assert [si for si, _ in previews] == [0, 1, 2, 3]
    torch.testing.assert_close(previews[-1][1], out.images)
    assert not torch.allclose(previews[0][1], out.images)


def test_previews_kept_past_the_callback_keep_their_own_scale(pipe):
    kept, seen = [], []

    def keep(p):
        kept.append(p)
        seen.append(p.to_images("pt"))

    out = pipe([1, 2], seed=0, output_type="pt", callback_on_scale=keep)
    later = [p.to_images("pt") for p in kept]  # decoded after the call, when the running latent is final
    assert all(torch.equal(a, b) for a, b in zip(seen, later))
    assert not torch.allclose(later[0], out.images), "the first preview is not the final image"


def test_a_folder_keeps_its_sampling_defaults_and_refiner(tmp_path):
    var, vae = tiny_pair(1)
    refiner, _ = tiny_pair(2, dict(depth=1))
    VARPipeline(var, vae, sampling_defaults={"cfg": 3.0, "top_p": 0.9}, refiner=refiner).save_pretrained(tmp_path)
    again = VARPipeline.from_pretrained(tmp_path)
    assert again.sampling_defaults["cfg"] == 3.0 and again.sampling_params().top_p == 0.9
    assert again.refiner is not None and again.refiner.depth == 1 and again.channels_last_decoder is True


def test_save_and_load_pretrained_give_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    again = VARPipeline.from_pretrained(tmp_path / "m")
    assert again.class_names == NAMES
    a = pipe([0, 1], seed=4, output_type="pt").images
    b = again([0, 1], seed=4, output_type="pt").images
    assert torch.equal(a, b)


def test_bfloat16_option_runs_and_stays_close():
    var, vae = tiny_pair(1)
    fp32 = VARPipeline(var, vae)
    ref = fp32([1, 2], seed=0, top_k=1, cfg=1.0, output_type="pt")
    var, vae = tiny_pair(1)
    bf16 = VARPipeline(var, vae, dtype=torch.bfloat16)
    assert bf16.transformer.head.weight.dtype == torch.bfloat16
    assert bf16.vae.quantize.embedding.weight.dtype == torch.float32  # code search stays fp32
    out = bf16([1, 2], seed=0, top_k=1, cfg=1.0, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    agree = torch.cat([(a == b).float().flatten() for a, b in zip(ref.tokens, out.tokens)]).mean()
    assert agree > 0.5, f"bf16 greedy tokens agree with fp32 on only {agree:.0%}"


def test_grey_model_gives_L_images():
    var, vae = tiny_pair(2, {}, dict(in_channels=1))
    out = VARPipeline(var, vae)([0], seed=0)
    assert out.images[0].mode == "L"


def test_keep_maps_follow_the_official_rule():
    side = 4
    keep = torch.zeros(side, side)
    keep[:, :2] = 1  # keep the left half
    maps = keep_maps(keep, (1, 2, 3, 4), batch=2)
    assert [m.shape for m in maps] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert maps[0].all(), "maps of <= 3 tokens are kept whole"
    assert maps[1][0].tolist() == [True, False, True, False]
    assert maps[3][0].view(4, 4)[:, :2].all() and not maps[3][0].view(4, 4)[:, 2:].any()


def test_edit_keeps_the_input_outside_the_mask(pipe):
    size = pipe.image_size
    img = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    tokens_in = pipe.encode(x)
    mask = box_mask(size, 0.0, 0.5, 1.0, 1.0)  # generate the right half
    out = pipe.edit(img, mask, class_label="coat", seed=0, top_k=10, num_images=2)
    keep = keep_maps(1 - mask, pipe.patch_nums, 2)
    for tok, src, k in zip(out.tokens, tokens_in, keep):
        assert torch.equal(tok[k], src.expand(2, -1)[k])
    assert out.labels == [4, 4]
    nothing = pipe.edit(img, torch.zeros(size, size), seed=0)  # nothing to generate: the reconstruction
    assert all(torch.equal(t, s) for t, s in zip(nothing.tokens, tokens_in))


def test_edit_input_validation(pipe):
    with pytest.raises(InvalidInputError, match="mask must be 2-D"):
        pipe.edit(np.zeros((pipe.image_size, pipe.image_size, 3), np.uint8), np.zeros((2, 3, 4)))
    with pytest.raises(InvalidInputError, match="cannot read image"):
        pipe.edit("/nonexistent.png", np.zeros((4, 4)))
