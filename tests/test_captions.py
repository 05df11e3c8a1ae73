"""Captioned datasets: Hugging Face-style captioned image folders and the built-in ``fashion_pairs`` (hold-outs,
canvas layout, determinism, prompt parsing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextscale.data import (
    FASHION_MNIST_CLASSES,
    HELD_OUT_PAIRS,
    HELD_OUT_TEMPLATES,
    CaptionedImageFolder,
    FashionPairs,
    ImageFolder,
    TensorImageDataset,
    fashion_mnist,
    fashion_pairs,
    parse_pair_prompt,
    prompts,
)
from nextscale.data.captions import (
    _KNOWN_WORDS,
    _NOUNS,
    SEEN_TEMPLATES,
    SYNONYMS,
    TEMPLATES,
    _fill,
    _matches,
    noun_spans,
    varied_captions,
)
from nextscale.errors import InvalidInputError
from nextscale.labels import resolve_label

from .helpers import needs_fashion


def _save(path: Path, seed: int, size: tuple[int, int] = (20, 14)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _write_jsonl(root: Path, lines: list[object]) -> None:
    (root / "metadata.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "captioned"
    _save(root / "a.png", 0)
    _save(root / "sub" / "b.JPG", 1, (9, 30))
    _save(root / "unlisted.png", 2)
    return root


# ------------------------------------------------------------------------------------- captioned image folder


def test_jsonl_folder(folder: Path):
    _write_jsonl(
        folder,
        [
            {"file_name": "a.png", "text": "a red square", "extra": 1},
            "",
            {"file_name": "sub/b.JPG", "text": "a tall thing"},
            {"file_name": "a.png", "text": "the same image, another caption"},
        ],
    )
    ds = CaptionedImageFolder(folder, image_size=8, train=False)
    assert len(ds) == 3 and ds.num_unlisted == 1
    assert ds.captions == ["a red square", "a tall thing", "the same image, another caption"]
    image, caption = ds[1]
    assert caption == "a tall thing" and image.shape == (3, 8, 8) and -1 <= image.min() <= image.max() <= 1
    (folder / "only").mkdir()
    (folder / "a.png").rename(folder / "only" / "a.png")
    same, _ = ImageFolder(folder / "only", 8, train=False)[0]  # the image exactly as ImageFolder serves it
    (folder / "only" / "a.png").rename(folder / "a.png")
    assert torch.equal(ds[0][0], same) and torch.equal(ds[2][0], same)


def test_csv_folder_and_random_crops(folder: Path):
    csv_text = 'file_name,text,score\na.png,"a square, red",3\nsub/b.JPG,"two\nlines",1\n'
    (folder / "metadata.csv").write_text("\ufeff" + csv_text, encoding="utf-8")  # with a byte-order mark
    ds = CaptionedImageFolder(folder, image_size=8, channels=1, seed=5)
    assert ds.captions == ["a square, red", "two\nlines"] and ds.num_unlisted == 1
    assert ds[1][0].shape == (1, 8, 8)
    again = CaptionedImageFolder(folder, image_size=8, channels=1, seed=5)
    assert torch.equal(ds[1][0], again[1][0]) and not ds.hflip  # crops follow the seed; never mirrored


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([{"text": "x"}], r"metadata.jsonl:1: record has no 'file_name' \(its fields: 'text'\)"),
        ([{"file_name": "a.png", "text": "ok"}, {"file_name": "a.png"}], r"metadata.jsonl:2: record has no 'text'"),
        ([{"file_name": "a.png", "text": 3}], r"metadata.jsonl:1: text must be a string, got 3"),
        (
            [{"file_name": "a.png", "text": "ok"}, "", {"file_name": "nope.png", "text": "x"}],
            r":3: file_name 'nope.png'",
        ),
        ([{"file_name": "a.png", "text": "  "}], r"metadata.jsonl:1: empty caption \(text\) for file_name 'a.png'"),
        ([{"file_name": "notes.txt", "text": "x"}], r"file_name 'notes.txt' is not an image"),
        ([{"file_name": "../a.png", "text": "x"}], r"file_name '../a.png' must be a relative path"),
        (['{"file_name": "a.png", "text": '], r"metadata.jsonl:1: not valid JSON"),
        (['["a.png", "x"]'], r"metadata.jsonl:1: expected a JSON object, got list"),
        ([""], r"metadata.jsonl: no records"),
    ],
)
def test_jsonl_errors_name_the_line_and_value(folder: Path, lines: list[object], match: str):
    _write_jsonl(folder, lines)
    with pytest.raises(InvalidInputError, match=match):
        CaptionedImageFolder(folder, 8)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file_name,caption\na.png,x\n", r"metadata.csv:1: no column text \(columns: file_name, caption\)"),
        ("file_name,text\na.png,x\nsub/b.JPG\n", r"metadata.csv:3: record has no 'text'"),
        ("file_name,text\na.png,\n", r"metadata.csv:2: empty caption \(text\) for file_name 'a.png'"),
        ("file_name,text\nmissing/c.png,x\n", r"metadata.csv:2: file_name 'missing/c.png' does not exist"),
    ],
)
def test_csv_errors_name_the_line_and_value(folder: Path, text: str, match: str):
    (folder / "metadata.csv").write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        CaptionedImageFolder(folder, 8)


def test_metadata_file_errors(folder: Path, tmp_path: Path):
    with pytest.raises(InvalidInputError, match=r"captioned: no metadata.jsonl or metadata.csv"):
        CaptionedImageFolder(folder, 8)
    _write_jsonl(folder, [{"file_name": "a.png", "text": "x"}])
    (folder / "metadata.csv").write_text("file_name,text\na.png,x\n")
    with pytest.raises(InvalidInputError, match=r"both metadata.jsonl and metadata.csv"):
        CaptionedImageFolder(folder, 8)
    with pytest.raises(InvalidInputError, match=r"no such folder"):
        CaptionedImageFolder(tmp_path / "missing", 8)
    with pytest.raises(InvalidInputError, match=r"seed must be an int >= 0, got -1"):
        CaptionedImageFolder(folder, 8, seed=-1)


def test_metadata_is_checked_before_any_image_is_read(folder: Path):
    (folder / "a.png").write_bytes(b"not a png")
    _write_jsonl(folder, [{"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"}])
    with pytest.raises(InvalidInputError, match=r"'gone.png' does not exist"):  # not the unreadable a.png
        CaptionedImageFolder(folder, 8)
    _write_jsonl(folder, [{"file_name": "a.png", "text": "x"}])
    ds = CaptionedImageFolder(folder, 8)  # construction reads no image
    with pytest.raises(InvalidInputError, match=r"a.png: cannot read image"):
        ds[0]


# --------------------------------------------------------------------------------------- prompts and parsing


def test_synonyms_are_names_the_label_resolver_accepts():
    for c, nouns in enumerate(SYNONYMS):
        for noun in nouns:
            assert resolve_label(noun, len(FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES) == c


def test_parse_round_trips_every_template_pair_and_noun():
    for t, template in enumerate(TEMPLATES):
        for a, b in np.ndindex(10, 10):
            for left in SYNONYMS[a]:
                for right in SYNONYMS[b]:
                    text = _fill(template, left, right)
                    assert _matches(text) == {(t, a, b)}, text
                    assert parse_pair_prompt(text) == (a, b)
    assert parse_pair_prompt("  An ANKLE boot on the left and a T-shirt/top on the right. ") == (9, 0)
    assert parse_pair_prompt("a cat on the left and a dog on the right") is None
    assert parse_pair_prompt("3 and 5") is None
    with pytest.raises(InvalidInputError, match=r"prompt must be a string, got int"):
        parse_pair_prompt(3)  # type: ignore[arg-type]


def test_prompt_kinds():
    held_t = set(range(len(SEEN_TEMPLATES), len(TEMPLATES)))
    sizes = {"seen": 90 * 6, "held-out-pairs": 10 * 6, "held-out-phrasings": 90 * 2, "all": 100 * 8}
    for kind, size in sizes.items():
        triples = prompts(kind)
        assert len(triples) == size == len({p for p, _, _ in triples})
        for prompt, a, b in triples:
            ((t, pa, pb),) = _matches(prompt)
            assert (pa, pb) == (a, b)
            if kind != "all":
                assert ((a, b) in HELD_OUT_PAIRS) == (kind == "held-out-pairs")
                assert (t in held_t) == (kind == "held-out-phrasings")
    assert {(a, b) for _, a, b in prompts("held-out-pairs")} == set(HELD_OUT_PAIRS)
    assert len(HELD_OUT_TEMPLATES) == len(held_t)
    with pytest.raises(InvalidInputError, match=r"kind must be one of seen, .*; got 'unseen'"):
        prompts("unseen")
    chosen = [(0, 4), (9, 3)]  # other pairs, in a kind's phrasings (a validation set of training pairs)
    triples = prompts("seen", chosen)
    assert len(triples) == 2 * len(SEEN_TEMPLATES)
    assert {t for p, _, _ in triples for t, _, _ in _matches(p)} == set(range(len(SEEN_TEMPLATES)))
    assert [(a, b) for p, a, b in triples] == [pair for pair in chosen for _ in SEEN_TEMPLATES]
    assert all({(a, b)} == {(x, y) for _, x, y in _matches(p)} for p, a, b in triples)
    with pytest.raises(InvalidInputError, match=r"pairs must be \(left, right\) classes in 0..9; got \(3, 10\)"):
        prompts("seen", [(3, 10)])


def _read_varied(text: str) -> tuple[int, int]:
    """The pair a ``varied_captions`` caption says, read by the grammar's rules independently of the generator: a
    side label ("left:") binds to the next noun, any other side word to the noun before it, and a relative clause
    ("... to the left of ...") to its first noun; a noun with no side takes the other's, two bare ones read left
    to right; the side a caption of one item leaves out reads -1."""
    nouns = "|".join(re.escape(n) for n in sorted(_NOUNS, key=len, reverse=True))
    found = [(m.group(1), m.group(2), m.group(3)) for m in re.finditer(rf"\b({nouns})\b|\b(left|right)\b(:?)", text)]
    classes = [_NOUNS[n] for n, _, _ in found if n]
    assert len(classes) in (1, 2), text
    side: dict[int, str] = {}
    seen_nouns = 0
    for noun, word, label in found:
        if noun:
            seen_nouns += 1
        elif label:
            side[seen_nouns] = word  # the next noun
        elif " of " in text:
            side[0] = word
        else:
            assert seen_nouns, text
            side[seen_nouns - 1] = word
    if not side:
        return classes[0], classes[1]
    k, word = next(iter(side.items()))
    if len(classes) == 1:
        return (classes[0], -1) if word == "left" else (-1, classes[0])
    if len(side) == 2:
        assert side[0] != side[1], text
    on_left = k if word == "left" else 1 - k
    return classes[on_left], classes[1 - on_left]


def test_varied_captions_say_their_pair_and_keep_the_hold_outs_out():
    pairs = torch.tensor([[a, b] for a, b in np.ndindex(10, 10)] * 30)
    plain, said = varied_captions(pairs, seed=3, fillers=0.0)
    assert plain == varied_captions(pairs, seed=3, fillers=0.0)[0] != varied_captions(pairs, seed=4, fillers=0.0)[0]
    one = (said < 0).any(1)
    assert 0.1 < one.float().mean() < 0.25 and not (said < 0).all(1).any()  # one in six names a single item
    assert torch.equal(said[~one], pairs[~one]) and torch.equal(said.clamp(min=0) + pairs * (said < 0), pairs)
    for text, truth in zip(plain, said.tolist()):
        assert _read_varied(text) == tuple(truth), text
    # the six seen phrasings are instances of the grammar; the held-out ones never come out of it
    assert {t for text in plain for t, _, _ in _matches(text)} == set(range(len(SEEN_TEMPLATES)))
    padded, said_padded = varied_captions(pairs, seed=3, fillers=0.5)
    words = [set(re.findall(r"[a-z]+", text)) for text in padded]
    assert not any(w & {"with", "its"} for w in words)
    assert not any(t >= len(SEEN_TEMPLATES) for text in padded for t, _, _ in _matches(text))
    known = re.compile(rf"\b({'|'.join(sorted(_KNOWN_WORDS))})\b")
    made_up = [len(re.findall(r"[a-z]+", text)) - len(known.findall(text)) for text in padded]
    assert 0.3 < sum(n > 0 for n in made_up) / len(made_up) < 0.7  # about half get a made-up word
    for text, truth in zip(padded, said_padded.tolist()):
        assert _read_varied(text) == tuple(truth), text  # made-up words never change what a caption says
    with pytest.raises(InvalidInputError, match=r"fillers must be a probability in \[0, 1\), got 1.5"):
        varied_captions(pairs, fillers=1.5)
    with pytest.raises(InvalidInputError, match=r"pairs_N2 must be \[N, 2\] \(left, right class\), got \(3,\)"):
        varied_captions(torch.zeros(3, dtype=torch.long))


def test_noun_spans_say_each_nouns_side_and_class():
    text = "An Ankle boot on the left, right: a T-shirt"
    spans = noun_spans(text, (9, 0))
    assert [(text[a:b], side, c) for a, b, side, c in spans] == [("Ankle boot", 0, 9), ("T-shirt", 1, 0)]
    assert [s[2:] for s in noun_spans("a t-shirt/top to the right of an ankle boot", (9, 0))] == [(1, 0), (0, 9)]
    assert [s[2:] for s in noun_spans("bag and bag", (8, 8))] == [(-1, 8), (-1, 8)]  # which bag: not the noun's to say
    assert [s[2:] for s in noun_spans("right: a top", (-1, 0))] == [(1, 0)]
    assert noun_spans("a blurb of qualms", (3, 4)) == []  # made-up words are no nouns ("blurb" holds no "b")
    pairs = torch.tensor([[a, b] for a, b in np.ndindex(10, 10)] * 3)
    for text, said in zip(*varied_captions(pairs, seed=1)):
        spans = noun_spans(text, tuple(said.tolist()))
        assert sorted(c for *_, c in spans) == sorted(c for c in said.tolist() if c >= 0), text
    with pytest.raises(
        InvalidInputError, match=r"caption 'a bag and a coat' names 'coat', not a class it says \(8, 5\)"
    ):
        noun_spans("a bag and a coat", (8, 5))
    with pytest.raises(
        InvalidInputError, match=r"said must be \(left, right\) classes, -1 for a side not named; got \(8,\)"
    ):
        noun_spans("a bag", (8,))


def test_held_out_pairs_keep_each_class_and_mirror_in_training():
    assert len(set(HELD_OUT_PAIRS)) == 10
    assert sorted(a for a, _ in HELD_OUT_PAIRS) == sorted(b for _, b in HELD_OUT_PAIRS) == list(range(10))
    assert not any((b, a) in HELD_OUT_PAIRS for a, b in HELD_OUT_PAIRS)


# ------------------------------------------------------------------------------------------- fashion pairs


def _check_canvases(ds: FashionPairs, items: TensorImageDataset, count: int) -> None:
    s = items.image_size
    top = 0 if ds.wide else s // 2
    for i in range(count):
        image, caption = ds[i]
        assert image.shape == (ds.channels, s if ds.wide else 2 * s, 2 * s)
        left, right = (items[int(j)] for j in (ds.left_item_N[i], ds.right_item_N[i]))
        assert (left[1], right[1]) == (int(ds.left_label_N[i]), int(ds.right_label_N[i]))
        assert torch.equal(image[:, top : top + s, :s], left[0].expand(ds.channels, -1, -1))
        assert torch.equal(image[:, top : top + s, s:], right[0].expand(ds.channels, -1, -1))
        assert (image[:, :top] == -1).all() and (image[:, top + s :] == -1).all()  # black bands
        assert parse_pair_prompt(caption) == (left[1], right[1]), caption


def test_canvas_halves_are_the_items_on_fake_items():
    rng = np.random.default_rng(0)
    items = TensorImageDataset(
        rng.integers(0, 256, (40, 7, 7), dtype=np.uint8), np.arange(40) % 10, FASHION_MNIST_CLASSES
    )
    ds = FashionPairs(items, kind="held-out-pairs", seed=1, num=30, channels=3)
    assert len(ds) == 30 and ds.image_size == 14 and ds.height == 14
    assert {(int(a), int(b)) for a, b in zip(ds.left_label_N, ds.right_label_N)} <= set(HELD_OUT_PAIRS)
    _check_canvases(ds, items, 30)
    wide = FashionPairs(items, kind="held-out-pairs", seed=1, num=30, wide=True)  # the items alone, no bands
    assert wide.height == 7 and wide.image_size == 14 and wide.captions == ds.captions
    _check_canvases(wide, items, 30)
    with pytest.raises(InvalidInputError, match=r"items hold no 'Trouser'"):
        FashionPairs(TensorImageDataset(items.images[:1].permute(0, 2, 3, 1).numpy(), [0], FASHION_MNIST_CLASSES))


def test_fashion_pairs_argument_errors():
    with pytest.raises(InvalidInputError, match=r"split must be 'train' or 'test', got 'val'"):
        fashion_pairs("val")
    with pytest.raises(InvalidInputError, match=r"size must be an even int >= 2 .*got 31"):
        fashion_pairs("test", size=31)
    with pytest.raises(InvalidInputError, match=r"train split is always kind 'seen'.*got 'held-out-pairs'"):
        fashion_pairs("train", kind="held-out-pairs")
    with pytest.raises(InvalidInputError, match=r"num must be an int >= 1, got 0"):
        fashion_pairs("test", num=0)


@needs_fashion
def test_train_split_never_shows_held_out_pairs_or_phrasings():
    ds = fashion_pairs("train", size=56, seed=0)  # 28-pixel items: no resize, fast
    assert len(ds) == 60_000 and ds.kind == "seen"
    pairs = set(zip(ds.left_label_N.tolist(), ds.right_label_N.tolist()))
    assert len(pairs) == 90 and not pairs & set(HELD_OUT_PAIRS)
    assert set(ds.template_N.tolist()) == set(range(len(SEEN_TEMPLATES)))
    for i in range(0, len(ds), 20):  # 3,000 captions, read back through every template
        ((t, a, b),) = _matches(ds.caption(i))
        assert t < len(SEEN_TEMPLATES) and (a, b) == (int(ds.left_label_N[i]), int(ds.right_label_N[i]))


@needs_fashion
def test_fashion_pairs_canvases_match_the_test_items():
    ds = fashion_pairs("test", size=32, seed=3, num=64)
    assert ds.kind == "all" and ds.image_size == 32
    _check_canvases(ds, fashion_mnist("test", size=16), 64)


@needs_fashion
def test_load_captioned_reads_fashion_pairs_wide_and_folders(folder: Path):
    from nextscale.data import load_captioned

    ds = load_captioned("fashion-pairs", "val", 64)  # "val" is the test split, as load_dataset reads it
    assert ds[0][0].shape == (1, 32, 64) and ds.kind == "all" and len(ds) == 10_000
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a disc"}) + "\n")
    assert isinstance(load_captioned(folder, "train", 16), CaptionedImageFolder)
    with pytest.raises(InvalidInputError, match=r"dataset 'nowhere': not one of fashion-pairs and not a folder"):
        load_captioned("nowhere")


@needs_fashion
def test_fashion_pairs_deterministic_per_seed():
    a, b, c = (fashion_pairs("test", size=56, seed=s, num=200) for s in (7, 7, 8))
    for name in ("left_item_N", "right_item_N", "template_N", "noun_N2"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert [a.caption(i) for i in range(200)] == [b.caption(i) for i in range(200)]
    assert torch.equal(a[5][0], b[5][0]) and not torch.equal(a.left_item_N, c.left_item_N)
