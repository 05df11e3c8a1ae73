"""Text-to-image training: the bitwise tokenizer (``train-vae --arch bsq``), the tiny T5 text encoder built from
captions, the text-feature cache, and Infinity's objective (``train --arch infinity``: bit labels, Bitwise
Self-Correction, condition dropout to the learned null text), end to end into a model folder that
``InfinityPipeline`` samples from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nextscale.errors import ConfigError, InvalidInputError
from nextscale.models.infinity import text_attention, text_attention_batched
from nextscale.models.infinity_scales import schedule
from nextscale.models.tokenizers.bsq import BSQVAE, BSQVAEConfig, quantize_st

CAPTION_NOUNS = ("ring", "cross", "stripes")


def tiny_bsq(**kw) -> BSQVAE:
    cfg = BSQVAEConfig(**{"bits": 6, "base_ch": 24, "ch_mult": (1, 1, 1), "num_res_blocks": 1, "patch_size": 4, **kw})
    torch.manual_seed(0)
    return BSQVAE(cfg).eval()


# ---- the tokenizer's shapes and its training path ------------------------------------------------------------
def test_bsq_patch_sizes_and_token_stride():
    assert BSQVAEConfig().token_stride == 16 and not BSQVAEConfig().patchify
    f8 = BSQVAEConfig(ch_mult=(1, 2, 4, 4), patch_size=8)
    assert f8.patchify and f8.token_stride == 16 and f8.token_bits == 4 * f8.bits  # as released
    p4 = BSQVAEConfig(ch_mult=(1, 2, 2), patch_size=4)
    assert not p4.patchify and p4.token_stride == 4
    assert BSQVAEConfig(ch_mult=(1, 2, 4, 4), patch_size=8, spatial_patchify=False).token_stride == 8
    with pytest.raises(ConfigError, match="patch_size must be one of 4, 8, 16, got 2"):
        BSQVAEConfig(patch_size=2)
    with pytest.raises(ConfigError, match="spatial_patchify must be true, false or null"):
        BSQVAEConfig(spatial_patchify="yes")


def test_small_schedule_at_a_small_stride():
    wide = schedule(0.5, "0.04M", stride=4)
    assert wide.grids == ((1, 1), (2, 2), (2, 4), (3, 6), (5, 10), (8, 16))
    assert wide.image_size == (32, 64) and wide.seq_len == 209
    assert schedule(1.0, "0.04M").image_size == (192, 192)  # 16 px per token: the releases' stride


def test_training_quantizer_is_the_sampling_one():
    """The straight-through quantizer the tokenizer trains with gives the decoder exactly the latent that
    ``quantize`` (the tokens the transformer learns and samples) gives: the code sum of every scale."""
    vae = tiny_bsq()
    grids = list(schedule(1.0, "0.04M", stride=4).vae_grids(False))
    h = vae.encode_features(torch.rand(3, 3, 48, 48) * 2 - 1)
    z_train, commit, entropy = quantize_st(h, grids)
    z_sample, bits = vae.quantize(h, grids)
    torch.testing.assert_close(z_train, z_sample, rtol=0, atol=2e-6)
    assert [tuple(b.shape[2:4]) for b in bits] == grids
    assert commit.item() > 0 and torch.isfinite(entropy)
    recon, *_ = vae(torch.rand(2, 3, 48, 48), grids)
    assert recon.shape == (2, 3, 48, 48)


def test_bitwise_self_correction_flips():
    vae = tiny_bsq()
    grids = list(schedule(1.0, "0.04M", stride=4).vae_grids(False))
    h = vae.encode_features(torch.rand(4, 3, 48, 48) * 2 - 1)
    g = torch.Generator().manual_seed(0)

    def masks(rates: list[float]) -> list[torch.Tensor]:
        return [torch.rand(4, 1, a, b, 6, generator=g) < r for (a, b), r in zip(grids, rates)]

    x0, gt0 = vae.bsc_inputs(h, grids, False)
    x_none, gt_none = vae.bsc_inputs(h, grids, False, masks([0.0] * len(grids)))
    assert torch.equal(x0, x_none) and all(torch.equal(a, b) for a, b in zip(gt0, gt_none))
    # flips at the last scale change no input (nothing follows it) and no target
    x_last, gt_last = vae.bsc_inputs(h, grids, False, masks([0.0] * 5 + [0.5]))
    assert torch.equal(x_last, x0) and all(torch.equal(a, b) for a, b in zip(gt_last, gt0))
    # flips at scale 2: its own targets stay the true bits; the next input and the later targets correct them
    x2, gt2 = vae.bsc_inputs(h, grids, False, masks([0.0, 0.0, 0.3, 0.0, 0.0, 0.0]))
    assert all(torch.equal(gt2[si], gt0[si]) for si in range(3))
    begin3 = sum(a * b for a, b in grids[1:3])  # x holds the inputs of scales 1.. (scale 0 is the text token)
    assert torch.equal(x2[:, :begin3], x0[:, :begin3]) and not torch.equal(x2[:, begin3:], x0[:, begin3:])
    assert not torch.equal(gt2[3], gt0[3])
    # the flipped scale's contribution is exactly the codes of the flipped bits: flipping every bit of scale 0
    # negates its code, which the residual of scale 1 then carries
    x_all, _ = vae.bsc_inputs(h, grids, False, [torch.ones(4, 1, 1, 1, 6, dtype=torch.bool), *[None] * 5])
    first = x0[:, :4].reshape(4, 2, 2, 6)  # scale 1's input: scale 0's code upsampled (1x1 -> constant)
    torch.testing.assert_close(x_all[:, :4].reshape(4, 2, 2, 6), -first)


def test_batched_text_attention_matches_the_varlen_one():
    g = torch.Generator().manual_seed(0)
    lens = (3, 7, 1)
    q = torch.randn(3, 5, 2, 16, generator=g)
    k = [torch.randn(n, 2, 16, generator=g) for n in lens]
    v = [torch.randn(n, 2, 16, generator=g) for n in lens]
    exact = text_attention(q, [t.to(torch.bfloat16) for t in k], [t.to(torch.bfloat16) for t in v], 0.25)
    batched = text_attention_batched(q, k, v, 0.25)
    # the varlen path rounds q, k, v and the output to bf16 as the official kernel does: 3 roundings of 2^-9
    torch.testing.assert_close(batched, exact, rtol=0.02, atol=0.02)


# ---- the text encoder and the feature cache ----------------------------------------------------------------
def captions(n: int = 40) -> list[str]:
    return [f"a {CAPTION_NOUNS[i % 3]} on the left and a {CAPTION_NOUNS[(i // 3) % 3]} on the right" for i in range(n)]


@pytest.fixture(scope="module")
def text_encoder_dir(tmp_path_factory) -> Path:
    from nextscale.models.text_encoder import save_tokenizer
    from nextscale.train.text_encoder import TinyT5Config, caption_tokenizer, tiny_t5

    folder = tmp_path_factory.mktemp("t5")
    tok = caption_tokenizer(captions())
    enc = tiny_t5(tok, TinyT5Config(d_model=128, num_layers=1, num_heads=2, d_ff=128))
    enc.encoder.save_pretrained(folder)
    save_tokenizer(tok, folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    return folder


def test_caption_tokenizer_reads_any_text(text_encoder_dir):
    from nextscale.models.text_encoder import TextEncoder

    enc = TextEncoder.from_pretrained(text_encoder_dir)
    tok = enc.tokenizer
    ids = tok("A Ring on the left and a cross on the right").input_ids
    assert ids == tok("a ring on the left and a cross on the right").input_ids  # lowercased
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert len(ids) == 12  # one token per caption word, then </s>
    labelled = tok("left: a ring, right: a cross").input_ids  # punctuation is its own token: "left:" is "left"
    assert tok.convert_ids_to_tokens(labelled[:5]) == ["▁left", ":", "▁a", "▁ring", ","]
    assert (labelled[0], labelled[3], labelled[5]) == (ids[4], ids[1], ids[10])  # the words of "... on the left"
    unseen = tok("a purple giraffe!").input_ids
    assert tok.unk_token_id not in unseen and len(unseen) > 4  # pieces, not <unk>
    feats = enc.encode(["a ring on the left and a cross on the right", "giraffe"], pad_to_max_length=False)
    assert feats.lens == (12, len(tok("giraffe").input_ids)) and feats.channels == 128


def test_slot_training_changes_the_encoder_and_freezes_it(text_encoder_dir):
    from nextscale.models.text_encoder import TextEncoder
    from nextscale.train.text_encoder import SlotHeads, slot_accuracy, train_slots

    enc = TextEncoder.from_pretrained(text_encoder_dir)
    caps = captions(36)
    slots = torch.tensor([[i % 3, (i // 3) % 3] for i in range(36)])
    before = {k: v.clone() for k, v in enc.encoder.state_dict().items()}
    unsaid = slots.clone()
    unsaid[:, 1] = -1  # no caption says slot 1: it gets no loss, so its head never moves
    torch.manual_seed(0)
    heads, last = train_slots(enc, caps, unsaid, [3, 3], steps=40, batch_size=16, lr=3e-3)
    assert not enc.encoder.training and not any(p.requires_grad for p in enc.encoder.parameters())
    assert any(not torch.equal(before[k], v) for k, v in enc.encoder.state_dict().items())
    assert 0.0 <= slot_accuracy(enc, heads, caps, slots) <= 1.0 and last["loss"] > 0
    torch.manual_seed(0)  # the heads' initialisation, as train_slots drew it
    fresh = SlotHeads(128, [3, 3])
    assert torch.equal(heads.heads[1].weight, fresh.heads[1].weight)
    assert not torch.equal(heads.heads[0].weight, fresh.heads[0].weight)
    with pytest.raises(Exception, match="slots_NS must be"):
        train_slots(enc, caps, slots[:5], [3, 3], steps=1)


def test_word_targets_label_the_tokens_of_each_span(text_encoder_dir):
    from nextscale.models.text_encoder import TextEncoder
    from nextscale.train.text_encoder import word_targets

    tok = TextEncoder.from_pretrained(text_encoder_dir).tokenizer
    texts = ["a ring on the left and a cross on the right", "left: stripes"]
    t = tok(texts, padding="longest", return_tensors="pt", return_offsets_mapping=True)
    ring, cross, stripes = (texts[0].index("ring"), 0, 1), (texts[0].index("cross"), 1, -1), (6, -1, 2)
    spans = [[(a, a + len(w), slot, value) for (a, slot, value), w in zip((ring, cross), ("ring", "cross"))]]
    spans.append([(stripes[0], stripes[0] + len("stripes"), stripes[1], stripes[2])])
    slot_BN, value_BN = word_targets(t.offset_mapping, t.attention_mask, spans, slots=2, values=3)
    words = [tok.convert_ids_to_tokens(ids) for ids in t.input_ids.tolist()]
    assert words[0][1] == "▁ring" and words[0][7] == "▁cross" and "▁stripes" in words[1]
    # "▁ring" covers the space before "ring" and still is the word; -1 (not known) is no loss, as padding is
    assert slot_BN[0].tolist() == [2, 0, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2]  # </s> (no characters) reads none
    assert value_BN[0].tolist() == [3, 1, 3, 3, 3, 3, 3, -100, 3, 3, 3, 3]
    k = words[1].index("▁stripes")
    assert slot_BN[1, k] == -100 and value_BN[1, k] == 2 and slot_BN[1, k + 2 :].eq(-100).all()


def test_word_spans_train_a_tagger_beside_the_slot_heads(text_encoder_dir):
    from nextscale.models.text_encoder import TextEncoder
    from nextscale.train.text_encoder import train_slots

    caps = captions(36)
    slots = torch.tensor([[i % 3, (i // 3) % 3] for i in range(36)])
    spans = []
    for text, (a, b) in zip(caps, slots.tolist()):
        first = text.index(" ", 2)  # "a ring on ...": the first noun ends at the next space
        second = text.index(CAPTION_NOUNS[b], first + len(" on the left and a "))
        spans.append([(2, first, 0, a), (second, second + len(CAPTION_NOUNS[b]), 1, b)])
    runs = {}
    for name, kw in (("slots", {}), ("words", {"spans": spans})):
        enc = TextEncoder.from_pretrained(text_encoder_dir)
        torch.manual_seed(0)
        _, last = train_slots(enc, caps, slots, [3, 3], steps=20, batch_size=8, lr=3e-3, **kw)
        runs[name] = (enc.encoder.state_dict(), last)
    # the same data order and heads, so the encoders differ by the tagging loss alone
    assert any(not torch.equal(v, runs["words"][0][k]) for k, v in runs["slots"][0].items())
    assert runs["words"][1]["loss"] > 0
    enc = TextEncoder.from_pretrained(text_encoder_dir)
    bad = [list(s) for s in spans]
    bad[3] = [(2, 99, 0, 1)]
    with pytest.raises(InvalidInputError, match=r"span \(2, 99, 0, 1\) of caption 3 .*0 <= start < end <= \d+"):
        train_slots(enc, caps, slots, [3, 3], steps=1, spans=bad)
    bad[3] = [(2, 6, 0, 3)]  # slot 0 has 3 classes
    with pytest.raises(InvalidInputError, match=r"span \(2, 6, 0, 3\) of caption 3"):
        train_slots(enc, caps, slots, [3, 3], steps=1, spans=bad)
    with pytest.raises(InvalidInputError, match=r"spans must give one list per caption \(36\), got 2"):
        train_slots(enc, caps, slots, [3, 3], steps=1, spans=spans[:2])


def test_a_frozen_encoder_probe_trains_the_heads_alone_and_reports_each_step(text_encoder_dir):
    from nextscale.models.text_encoder import TextEncoder
    from nextscale.train.text_encoder import read_slots, train_slots

    enc = TextEncoder.from_pretrained(text_encoder_dir)
    caps = captions(36)
    slots = torch.tensor([[i % 3, (i // 3) % 3] for i in range(36)])
    before = {k: v.clone() for k, v in enc.encoder.state_dict().items()}
    seen: list[int] = []
    heads, _ = train_slots(
        enc, caps, slots, [3, 3], steps=5, batch_size=8, freeze_encoder=True, on_step=lambda n, h: seen.append(n)
    )
    assert seen == [1, 2, 3, 4, 5]
    assert all(torch.equal(before[k], v) for k, v in enc.encoder.state_dict().items())
    assert not enc.encoder.training and not any(p.requires_grad for p in enc.encoder.parameters())
    logits = read_slots(enc, heads, caps[:4])
    assert [tuple(lg.shape) for lg in logits] == [(4, 3), (4, 3)]


def test_text_features_are_cached_by_encoder_and_captions(text_encoder_dir, tmp_path, monkeypatch, caplog):
    from nextscale.models.text_encoder import TextEncoder
    from nextscale.train import dist
    from nextscale.train.text_cache import cache_path, cached_caption_features, encode_captions

    monkeypatch.setenv("NEXTSCALE_CACHE", str(tmp_path))
    enc = TextEncoder.from_pretrained(text_encoder_dir)
    caps = captions(12) + captions(3)  # repeats are encoded once
    first = cached_caption_features(enc, caps, dist.DistInfo())
    assert len(first.captions) == 9 and cache_path(enc, first.captions).is_file()
    with caplog.at_level(logging.INFO, logger="nextscale.train"):
        again = cached_caption_features(enc, caps, dist.DistInfo())
    assert "reusing the cached text features" in caplog.text
    assert torch.equal(again.kv_NC, first.kv_NC) and torch.equal(again.lens_N, first.lens_N)
    # the packed rows are the encoder's own features of each caption (padded to the longest: same up to rounding)
    direct = encode_captions(enc, first.captions[:1])
    torch.testing.assert_close(first.rows([0])[0], direct.rows([0])[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        enc.encoder.shared.weight.add_(0.01)
    assert cache_path(enc, first.captions) != cache_path(TextEncoder.from_pretrained(text_encoder_dir), first.captions)
    cache_path(enc, first.captions).parent.mkdir(parents=True, exist_ok=True)
    bad = cache_path(TextEncoder.from_pretrained(text_encoder_dir), first.captions)
    bad.write_bytes(b"not a tensor file")
    with caplog.at_level(logging.WARNING, logger="nextscale.train"):
        healed = cached_caption_features(TextEncoder.from_pretrained(text_encoder_dir), caps, dist.DistInfo())
    assert "unreadable" in caplog.text and torch.equal(healed.kv_NC, first.kv_NC)


# ---- end to end: a captioned folder -> tokenizer -> transformer -> pipeline -----------------------------------
def make_captioned_folder(root: Path, n: int = 24) -> Path:
    """Square RGB images of a ring, a cross or stripes, captioned with their noun in metadata.jsonl."""
    import numpy as np

    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:48, 0:48] / 48
    records = []
    for i in range(n):
        c = i % 3
        if c == 0:
            m = np.abs(np.hypot(xx - 0.5, yy - 0.5) - 0.3) < 0.06
        elif c == 1:
            m = (np.abs(xx - 0.5) < 0.08) | (np.abs(yy - 0.5) < 0.08)
        else:
            m = np.sin((xx + 0.1 * i) * 20) > 0
        Image.fromarray((np.stack([m, m, ~m], -1) * 255).astype(np.uint8)).save(root / f"{i:02d}.png")
        records.append({"file_name": f"{i:02d}.png", "text": f"a {CAPTION_NOUNS[c]}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_encoder_dir):
    """A tokenizer and a transformer trained a few steps each on a captioned folder, through the CLI."""
    from nextscale.cli.main import main

    root = tmp_path_factory.mktemp("t2i")
    data = make_captioned_folder(root / "data")
    common = ["--data", str(data), "--image-size", "48", "--pn", "0.04M", "--no-progress", "--log-every", "2"]
    tok_args = ["--bits", "6", "--base-ch", "24", "--ch-mult", "1,1,1", "--batch-size", "8", "--eval-every", "4"]
    assert main(["train-vae", "--arch", "bsq", *common, *tok_args, "--out-dir", str(root / "vae"), "--steps", "4"]) == 0
    inf_args = [
        *common,
        "--tokenizer",
        str(root / "vae" / "tokenizer"),
        "--text-encoder",
        str(text_encoder_dir),
        "--depth",
        "2",
        "--embed-dim",
        "64",
        "--num-heads",
        "2",
        "--batch-size",
        "8",
        "--eval-every",
        "3",
        "--steps",
        "6",
        "--cond-drop",
        "0.5",
    ]
    assert main(["train", "--arch", "infinity", *inf_args, "--out-dir", str(root / "inf")]) == 0
    return root, inf_args


def test_trained_model_samples_at_its_training_size(trained):
    from nextscale.pipelines.infinity import InfinityPipeline

    root, _ = trained
    assert (root / "vae" / "tokenizer" / "model_index.json").is_file()
    val = [json.loads(line) for line in (root / "inf" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in val if r["split"] == "val"]
    assert evals and all(0.0 < r["bit_acc"] <= 1.0 and "text_gain" in r for r in evals)
    pipe = InfinityPipeline.from_pretrained(root / "inf" / "model")
    assert pipe.sampling_defaults["pn"] == "0.04M" and pipe.sampling_defaults["size"] == "48x48"
    assert pipe.token_stride == 4 and pipe.image_size == 48
    out = pipe(["a ring", "a purple giraffe"], seed=3, output_type="pt")  # any text: pieces, never refused
    assert out.images.shape == (2, 3, 48, 48)
    assert out.stats["schedule"]["size"] == [48, 48] and out.stats["schedule"]["scales"] == 6
    index = json.loads((root / "inf" / "model" / "model_index.json").read_text())
    assert index["sampling_defaults"] == {"pn": "0.04M", "size": "48x48"}


def test_a_resumed_infinity_run_equals_an_uninterrupted_one(trained):
    """Bitwise Self-Correction draws flips from a checkpointed generator: a run killed and resumed ends with the
    weights of one that never stopped."""
    from nextscale.cli.main import main

    root, inf_args = trained
    out = root / "inf-resumed"
    assert main(["train", "--arch", "infinity", *inf_args, "--out-dir", str(out), "--stop-after", "4"]) == 0
    assert main(["train", "--arch", "infinity", *inf_args, "--out-dir", str(out), "--resume"]) == 0
    a = load_file(str(root / "inf" / "model" / "transformer" / "model.safetensors"))
    b = load_file(str(out / "model" / "transformer" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_infinity_run_fine_tunes_from_a_model_folder(trained, capsys):
    """``--init-from``: the run starts from the folder's transformer (a step at a learning rate of ~0 exports it as
    it was; its architecture wins over the depth given), and one that reads other bits is refused naming both."""
    import dataclasses

    from nextscale.cli.main import main
    from nextscale.errors import CheckpointError
    from nextscale.models.native_infinity import load_infinity_native
    from nextscale.train.infinity_task import InfinityTask

    root, inf_args = trained
    source = root / "inf" / "model"
    args = [*inf_args, "--steps", "1", "--lr", "1e-9", "--warmup", "0", "--depth", "1"]
    ft = ["train", "--arch", "infinity", *args, "--init-from"]
    assert main([*ft, str(source), "--out-dir", str(root / "ft")]) == 0
    assert f"initialised from {source}" in capsys.readouterr().err
    a = load_file(str(source / "transformer" / "model.safetensors"))
    b = load_file(str(root / "ft" / "model" / "transformer" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-5, rtol=0)
    want = dataclasses.replace(load_infinity_native(source)[0].cfg, bits=12)
    with pytest.raises(CheckpointError, match=r"cannot fine-tune from it here: token bits \(the tokenizer's\) 6 != 12"):
        InfinityTask._pretrained(str(source), want)
    assert main([*ft, str(root / "nope"), "--out-dir", str(root / "x")]) == 2
    assert f"init_from {root / 'nope'}: no such folder or file" in capsys.readouterr().err


def test_condition_dropout_trains_the_learned_null_text(trained):
    """Dropped captions become ``cfg_uncond[:len]``: those rows learn, the rows past every caption's length not."""
    from nextscale.models.infinity import official_uncond_rows

    root, _ = trained
    rows = load_file(str(root / "inf" / "model" / "transformer" / "model.safetensors"))["cfg_uncond"].float()
    init = official_uncond_rows(rows.shape[0], rows.shape[1])
    assert not torch.equal(rows[:2], init[:2])
    assert torch.equal(rows[16:], init[16:])  # captions here are "a ring" etc.: at most a few tokens


def test_training_flags_are_checked_per_arch(tmp_path, capsys):
    from nextscale.cli.main import main

    assert main(["train-vae", "--arch", "bsq", "--vocab-size", "64", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--vocab-size: not a setting of --arch bsq (a setting of --arch msvq)" in capsys.readouterr().err
    assert main(["train", "--arch", "infinity", "--tokenizer", str(tmp_path), "--out-dir", str(tmp_path / "y")]) == 2
    assert "text_encoder is required" in capsys.readouterr().err
    assert main(["train-vae", "--arch", "bsq", "--pn", "3M", "--out-dir", str(tmp_path / "z")]) == 2
    assert "pn must be one of 0.04M" in capsys.readouterr().err


def test_two_process_ddp_and_accumulation_match_one_process(trained, tmp_path):
    """Caption drops and bit flips are drawn for the global batch: 2 DDP processes, and one process accumulating
    2 micro-batches, train the weights one process does in one batch (also on steps that drop no caption)."""
    import os
    import subprocess
    import sys

    _, inf_args = trained
    args = [*inf_args, "--steps", "3", "--cond-drop", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "nextscale", "train", "--arch", "infinity", *args]
    subprocess.run([*cli, "--out-dir", str(tmp_path / "one")], check=True, capture_output=True, env=env)
    subprocess.run([*cli, "--out-dir", str(tmp_path / "acc"), "--grad-accum", "2"], check=True, capture_output=True)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    res = subprocess.run(
        [*ddp, "-m", "nextscale", "train", "--arch", "infinity", *args, "--out-dir", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    ref = load_file(str(tmp_path / "one" / "model" / "transformer" / "model.safetensors"))
    for run in ("acc", "ddp"):
        got = load_file(str(tmp_path / run / "model" / "transformer" / "model.safetensors"))
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4, msg=f"{run}: {k}")
