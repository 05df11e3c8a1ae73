"""Loading official checkpoints (config inference, strictness, clear errors) and the native folder format."""

import argparse
import dataclasses
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextscale.config import VARConfig
from nextscale.errors import CheckpointError
from nextscale.models.native_var import load_native, save_native
from nextscale.models.weights import (
    infer_vae_config,
    infer_var_config,
    load_official_pair,
    load_official_vae,
    load_official_var,
)
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair


def save_official(tmp_path: Path, var, vae) -> tuple[Path, Path]:
    """Write tiny models exactly as the official release does: torch.save(state_dict) incl. buffers."""
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    return tmp_path / "var.pth", tmp_path / "vae.pth"


def test_official_fixture_config_is_inferred(official_pair):
    var, vae = official_pair
    assert (var.cfg.depth, var.cfg.embed_dim, var.cfg.num_heads, var.cfg.num_classes) == (2, 128, 2, 1000)
    assert var.cfg.attn_l2_norm and not var.cfg.shared_aln and var.cfg.seq_len == 680
    c = vae.cfg
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, c.vocab_size) == (32, (1, 1, 2, 2, 4), 2, 32, 4096)
    assert (c.share_quant_resi, c.quant_resi, c.using_sa, c.using_mid_sa) == (4, 0.5, True, True)


@pytest.mark.parametrize(
    "var_kw, vae_kw",
    [
        ({}, {}),
        (dict(shared_aln=True, num_classes=3), dict(share_quant_resi=0)),
        (dict(mlp_ratio=2.0), dict(share_quant_resi=1, in_channels=1, using_sa=False, using_mid_sa=False)),
        ({}, dict(patch_nums=(1, 2, 4), ch_mult=(1, 1, 2), num_res_blocks=2)),
    ],
)
def test_tiny_configs_roundtrip_through_official_format(tmp_path, var_kw, vae_kw):
    var, vae = tiny_pair(0, var_kw, vae_kw)
    var_path, vae_path = save_official(tmp_path, var, vae)
    var2, vae2 = load_official_pair(var_path, vae_path)
    # drop_path_rate is a training setting the file cannot tell; the loader uses the official rule.
    assert var2.cfg == dataclasses.replace(var.cfg, drop_path_rate=0.1 * var.cfg.depth / 24)
    assert vae2.cfg == vae.cfg
    for (k, a), b in zip(var.state_dict().items(), var2.state_dict().values()):
        assert torch.equal(a, b), k


def test_patch_nums_argument_is_checked(tmp_path, fixtures_dir):
    with pytest.raises(CheckpointError, match=r"patch_nums=.*disagrees|gives"):
        load_official_var(fixtures_dir / "var.pth", patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 12, 17))
    with pytest.raises(CheckpointError, match=r"10 scales / 680 tokens"):
        load_official_var(fixtures_dir / "var.pth", patch_nums=(1, 2, 3))
    sd = torch.load(fixtures_dir / "var.pth", weights_only=True)
    del sd["lvl_1L"]  # without the level buffer only the length is left; the known schedule still resolves
    assert infer_var_config(sd).patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def test_unknown_schedule_needs_patch_nums(tmp_path):
    var, _ = tiny_pair(0, {}, dict(patch_nums=(1, 3, 4), ch_mult=(1, 2)))
    sd = var.state_dict()
    del sd["lvl_1L"]
    with pytest.raises(CheckpointError, match=r"cannot infer patch_nums .* pass patch_nums="):
        infer_var_config(sd, source="x.pth")
    assert infer_var_config(sd, patch_nums=(1, 3, 4)).patch_nums == (1, 3, 4)


def corrupt(tmp_path: Path, src: Path, kind: str) -> Path:
    out = tmp_path / f"{kind}.pth"
    data = src.read_bytes()
    out.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 100}[kind])
    return out


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_files_give_one_clear_error(tmp_path, fixtures_dir, kind):
    bad = corrupt(tmp_path, fixtures_dir / "var.pth", kind)
    with pytest.raises(CheckpointError, match=rf"{bad.name}: not a readable PyTorch checkpoint"):
        load_official_var(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file"):
        load_official_var(tmp_path / "nope.pth")


def test_empty_file_is_named(tmp_path):
    (tmp_path / "var.pth").touch()  # an interrupted download or copy
    with pytest.raises(CheckpointError, match=r"^\S+/var.pth: the file is empty \(0 bytes\)$"):
        load_official_var(tmp_path / "var.pth")


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_plain_pickle_is_refused_without_torch_warnings(tmp_path, protocol):
    path = tmp_path / "var.pth"
    with path.open("wb") as f:
        pickle.dump({"args": argparse.Namespace(lr=1)}, f, protocol=protocol)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as err:
        warnings.simplefilter("always")
        load_official_var(path)
    assert not caught, [str(w.message) for w in caught]
    message = str(err.value).removeprefix(f"{path}: ")
    assert len(message.splitlines()) == 1 and "\x1b" not in message and "pickle" in message, message


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "trainer.pth"
    torch.save({"args": argparse.Namespace(lr=1), "model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"weights_only") as err:
        load_official_var(path)
    # the detail is torch's reason, not its multi-line advice with terminal escape codes
    assert "argparse.Namespace" in str(err.value) and "\x1b" not in str(err.value), str(err.value)


def test_wrong_kind_of_checkpoint_is_named(fixtures_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"this is a VQ-VAE checkpoint, not a VAR"):
        load_official_var(fixtures_dir / "vae.pth")
    with pytest.raises(CheckpointError, match=r"this is a VAR transformer checkpoint, not a VQ-VAE"):
        load_official_vae(fixtures_dir / "var.pth")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=r"does not look like a VAR checkpoint: missing word_embed.weight"):
        load_official_var(other)
    torch.save([torch.zeros(1)], other)
    with pytest.raises(CheckpointError, match=r"expected a state dict"):
        load_official_var(other)


def test_mismatched_pair_is_refused(tmp_path, fixtures_dir):
    _, tiny_vae = tiny_pair(0)
    torch.save(tiny_vae.state_dict(), tmp_path / "tiny_vae.pth")
    with pytest.raises(
        CheckpointError,
        match=r"different families: the VAR predicts 4096 codes of dim 32, "
        "the VQ-VAE has 64 codes of dim 8",
    ):
        load_official_pair(fixtures_dir / "var.pth", tmp_path / "tiny_vae.pth")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("head.bias"), "missing keys .*head.bias"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys .*extra.weight"),
        (lambda sd: sd.__setitem__("head.bias", torch.zeros(63)), r"shape mismatches .*head.bias \(63,\)"),
        (lambda sd: sd.__setitem__("blocks.0.attn.zero_k_bias", torch.ones(64)), "zero_k_bias buffer is not zero"),
        (lambda sd: sd["attn_bias_for_masking"].zero_(), "attn_bias_for_masking does not match"),
    ],
)
def test_strict_loading_reports_what_is_wrong(tmp_path, edit, match):
    var, _ = tiny_pair(0)
    sd = dict(var.state_dict())
    edit(sd)
    torch.save(sd, tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match=match):
        load_official_var(tmp_path / "var.pth")


def test_wrapped_state_dict_and_512px_vae_statistics(tmp_path, fixtures_dir):
    var, _ = tiny_pair(0)
    torch.save({"state_dict": var.state_dict()}, tmp_path / "wrapped.pth")
    assert load_official_var(tmp_path / "wrapped.pth").cfg.embed_dim == var.cfg.embed_dim
    sd = torch.load(fixtures_dir / "vae.pth", weights_only=True)
    cfg = infer_vae_config(sd, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32))  # the 512 px schedule, same file
    assert cfg.image_size == 512


def test_native_roundtrip(tmp_path):
    var, vae = tiny_pair(4, dict(class_names=tuple("abcde")))
    folder = save_native(tmp_path / "model", var, vae)
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "transformer", "vae"}
    stored = load_file(folder / "transformer" / "model.safetensors")
    assert "attn_bias_for_masking" not in stored and "lvl_1L" not in stored
    var2, vae2, index = load_native(folder)
    assert var2.cfg == var.cfg and vae2.cfg == vae.cfg and index["_class_name"] == "VARPipeline"
    for a, b in zip(var.state_dict().values(), var2.state_dict().values()):
        assert torch.equal(a, b)
    save_native(folder, var, vae)  # overwriting replaces the folder atomically
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left behind"


def test_native_folder_errors(tmp_path):
    var, vae = tiny_pair(4)
    folder = save_native(tmp_path / "m", var, vae)
    w = folder / "vae" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"vae/model.safetensors: not a readable safetensors file"):
        load_native(folder)
    (folder / "transformer" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON"):
        load_native(folder)
    with pytest.raises(CheckpointError, match=r"model_index.json: missing"):
        load_native(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a model folder .* and not a hub repo id"):
        VARPipeline.from_pretrained(tmp_path / "does-not-exist")


def test_from_pretrained_hub_id_uses_the_hf_cache_offline(tmp_path):
    """The hub code path, offline: a repo already in the local Hugging Face cache."""
    var, vae = tiny_pair(6)
    snap = tmp_path / "hub" / "models--someone--tiny-var" / "snapshots" / "0123abcd"
    save_native(snap, var, vae)
    (tmp_path / "hub" / "models--someone--tiny-var" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-var" / "refs" / "main").write_text("0123abcd")
    pipe = VARPipeline.from_pretrained("someone/tiny-var", cache_dir=tmp_path / "hub", local_files_only=True)
    assert pipe.transformer.cfg == var.cfg
    with pytest.raises(CheckpointError, match=r"someone/other: not in the local Hugging Face cache"):
        VARPipeline.from_pretrained("someone/other", cache_dir=tmp_path / "hub", local_files_only=True)
    shutil.rmtree(tmp_path / "hub")


def test_preset_configs_have_the_release_parameter_counts():
    """Built on the meta device: parameter counts of the released models (var-state-dict-keys.md)."""
    from nextscale.config import PRESETS
    from nextscale.models.var import VAR

    expected = {
        "var-d16": 310_283_520,
        "var-d20": 600_917_136,
        "var-d24": 1_033_399_360,
        "var-d30": 2_010_020_356,
        "var-d36": 2_353_893_904,
    }
    for name, count in expected.items():
        with torch.device("meta"):
            model = VAR(PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == count, name
    assert isinstance(PRESETS["var-d16"], VARConfig)
