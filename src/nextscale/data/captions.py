"""Captioned images, for text-to-image training: Hugging Face ``imagefolder`` folders (``CaptionedImageFolder``) and
the built-in ``fashion_pairs`` (two Fashion-MNIST items side by side, with held-out pairs and phrasings to measure
compositional generalisation), and ``varied_captions``, the phrasing grammar a text encoder learns those pairs from.

Both return ``(image [C, H, W] float in [-1, 1], caption str)``, the image exactly as ``ImageFolder`` serves it.
This module knows nothing of text encoders or tokenizers: captions stay strings. Shape letters: ``N`` items of a
dataset.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from nextscale.data.builtin import FASHION_MNIST_CLASSES, fashion_mnist
from nextscale.data.datasets import (
    IMAGE_EXTENSIONS,
    CroppedFiles,
    TensorImageDataset,
    check_channels,
    check_seed,
    check_size,
    list_images,
)
from nextscale.data.sampler import seed_of
from nextscale.errors import InvalidInputError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
RECORD_KEYS = ("file_name", "text")
Record = tuple[int, str, str]  # (line number in the metadata file, file_name, text)

# ------------------------------------------------------------------------------------- captioned image folder


class CaptionedImageFolder(CroppedFiles):
    """Images under ``root`` captioned by ``root/metadata.jsonl`` (one JSON object a line) or ``root/metadata.csv``
    (a header row, then a record a row): the Hugging Face ``imagefolder`` convention. Each record has ``file_name``
    (the image's path relative to ``root``, ``/``-separated, sub-folders allowed) and ``text`` (its caption); other
    fields are ignored. Several records may name one image: each (image, caption) is an item. Images no record
    names are ignored, as Hugging Face does, and counted in ``num_unlisted``.

    The whole metadata file, and the existence of every file it names, is checked before any image is read.
    Images are read as ``ImageFolder`` reads them (``CroppedFiles``) but never mirrored: a caption may say "left".
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, train: bool = True, seed: int = 0):
        super().__init__(image_size, channels, train, hflip=False, seed=seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidInputError(f"{self.root}: no such folder (expected images beside a metadata.jsonl or .csv)")
        self.metadata = _metadata_file(self.root)
        records = _read_jsonl(self.metadata) if self.metadata.suffix == ".jsonl" else _read_csv(self.metadata)
        if not records:
            raise InvalidInputError(f"{self.metadata}: no records (expected one per image with file_name and text)")
        self.samples = [(_image_path(self.root, f"{self.metadata}:{line}", name), text) for line, name, text in records]
        listed = {path for path, _ in self.samples}
        self.num_unlisted = sum(path not in listed for path in list_images(self.root, recursive=True))

    @property
    def captions(self) -> list[str]:
        return [text for _, text in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        index = range(len(self.samples))[index]  # negative indices allowed; out of range -> IndexError
        path, text = self.samples[index]
        return self.load_image(path, index), text


def _metadata_file(root: Path) -> Path:
    found = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if not found:
        raise InvalidInputError(f"{root}: no metadata.jsonl or metadata.csv (records of file_name and text)")
    if len(found) > 1:  # Hugging Face's imagefolder refuses this too, rather than pick one silently
        raise InvalidInputError(f"{root}: both metadata.jsonl and metadata.csv exist; keep only one of them")
    return found[0]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs often write a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path}: cannot read as UTF-8 text: {e}") from e


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for line, raw in enumerate(_read_text(path).split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) hold no record
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise InvalidInputError(f"{path}:{line}: expected a JSON object, got {type(record).__name__} {raw!r}")
        records.append((line, *_check_record(f"{path}:{line}", record)))
    return records


def _read_csv(path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))  # quoted cells may span lines
    columns = reader.fieldnames or []
    if missing := [key for key in RECORD_KEYS if key not in columns]:
        raise InvalidInputError(f"{path}:1: no column {' or '.join(missing)} (columns: {', '.join(columns) or 'none'})")
    try:
        return [(reader.line_num, *_check_record(f"{path}:{reader.line_num}", row)) for row in reader]
    except csv.Error as e:
        raise InvalidInputError(f"{path}:{reader.line_num}: not valid CSV: {e}") from e


def _check_record(where: str, record: dict) -> tuple[str, str]:
    for key in RECORD_KEYS:
        if record.get(key) is None:  # a CSV row with too few cells reads as None
            fields = ", ".join(repr(k) for k in record if k is not None) or "none"
            raise InvalidInputError(f"{where}: record has no {key!r} (its fields: {fields})")
        if not isinstance(record[key], str):
            raise InvalidInputError(f"{where}: {key} must be a string, got {record[key]!r}")
    if not record["text"].strip():
        raise InvalidInputError(f"{where}: empty caption (text) for file_name {record['file_name']!r}")
    return record["file_name"], record["text"]


def _image_path(root: Path, where: str, name: str) -> Path:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise InvalidInputError(f"{where}: file_name {name!r} must be a relative path inside {root}")
    if rel.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InvalidInputError(
            f"{where}: file_name {name!r} is not an image (accepted: {', '.join(IMAGE_EXTENSIONS)})"
        )
    path = root.joinpath(*rel.parts)  # the same spelling list_images gives, so unlisted images can be counted
    if not path.is_file():
        raise InvalidInputError(f"{where}: file_name {name!r} does not exist in {root}")
    return path


# ------------------------------------------------------------------------------------------- fashion_pairs

# Ordered (left, right) class pairs never shown in training: class c beside class c+3 (mod 10), so each class is
# held out once on the left and once on the right, and the mirror pair (c+3, c) of each stays in training: a model
# has seen both items together, only not in this order. Indices into FASHION_MNIST_CLASSES.
HELD_OUT_PAIRS: tuple[tuple[int, int], ...] = tuple((c, (c + 3) % 10) for c in range(10))
# ``{left}``/``{right}`` is a class noun, ``{a_left}``/``{a_right}`` the noun with its article ("an ankle boot").
SEEN_TEMPLATES = (
    "{a_left} on the left and {a_right} on the right",
    "{a_right} to the right of {a_left}",
    "{left} and {right}",
    "{a_right} on the right, {a_left} on the left",
    "{a_left} to the left of {a_right}",
    "left: {left}, right: {right}",
)
HELD_OUT_TEMPLATES = (  # phrasings never in training
    "{a_right} with {a_left} to its left",
    "on the left {a_left}, on the right {a_right}",
)
TEMPLATES = SEEN_TEMPLATES + HELD_OUT_TEMPLATES
PROMPT_KINDS = ("seen", "held-out-pairs", "held-out-phrasings", "all")
# Each class's nouns are the "/"-separated alternatives of its name ("t-shirt", "top"): names nextscale.labels
# resolves to that class (labels sits in a higher layer, so tests check the agreement), so a caption's nouns are
# valid class labels too. Nothing is invented ("tee", "boot") that the resolver would refuse.
SYNONYMS: tuple[tuple[str, ...], ...] = tuple(tuple(name.lower().split("/")) for name in FASHION_MNIST_CLASSES)
_NOUNS = {noun: c for c, nouns in enumerate(SYNONYMS) for noun in (*nouns, FASHION_MNIST_CLASSES[c].lower())}
_NOUN_CHOICE = "|".join(re.escape(n) for n in sorted(_NOUNS, key=len, reverse=True))  # longest first: "t-shirt/top"


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _fill(template: str, left: str, right: str) -> str:
    return template.format(left=left, right=right, a_left=_article(left), a_right=_article(right))


def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\{\w+\})", template):
        field = piece.strip("{}") if piece.startswith("{") else None
        if field is None:
            parts.append(re.escape(piece))
        else:
            side = field.removeprefix("a_")
            parts.append(("an? " if field.startswith("a_") else "") + f"(?P<{side}>{_NOUN_CHOICE})")
    return re.compile("".join(parts))


_PATTERNS = tuple(_template_regex(t) for t in TEMPLATES)


def _pairs_and_templates(kind: str) -> tuple[list[tuple[int, int]], list[int]]:
    """The ordered class pairs and template indices of a prompt ``kind``."""
    if kind not in PROMPT_KINDS:
        raise InvalidInputError(f"kind must be one of {', '.join(PROMPT_KINDS)}; got {kind!r}")
    every = [(a, b) for a in range(len(FASHION_MNIST_CLASSES)) for b in range(len(FASHION_MNIST_CLASSES))]
    seen = [pair for pair in every if pair not in HELD_OUT_PAIRS]
    seen_t, held_t = list(range(len(SEEN_TEMPLATES))), list(range(len(SEEN_TEMPLATES), len(TEMPLATES)))
    return {
        "seen": (seen, seen_t),
        "held-out-pairs": (list(HELD_OUT_PAIRS), seen_t),
        "held-out-phrasings": (seen, held_t),
        "all": (every, seen_t + held_t),
    }[kind]


def prompts(kind: str, pairs: Sequence[tuple[int, int]] | None = None) -> list[tuple[str, int, int]]:
    """``(prompt, left_class, right_class)`` for every (pair, template) of ``kind``: "seen" (training pairs and
    phrasings: 90 x 6), "held-out-pairs" (HELD_OUT_PAIRS in seen phrasings: 10 x 6), "held-out-phrasings" (training
    pairs in HELD_OUT_TEMPLATES: 90 x 2) or "all" (100 x 8). A class with two nouns alternates between them.
    ``pairs``: these ordered class pairs instead of the kind's, in its phrasings (a validation set of pairs)."""
    kind_pairs, templates = _pairs_and_templates(kind)
    if pairs is None:
        pairs = kind_pairs
    elif bad := [p for p in pairs if len(p) != 2 or not all(0 <= c < len(SYNONYMS) for c in p)]:
        raise InvalidInputError(f"pairs must be (left, right) classes in 0..{len(SYNONYMS) - 1}; got {bad[0]!r}")
    out = []
    for i, ((a, b), t) in enumerate(itertools.product(pairs, templates)):
        left, right = SYNONYMS[a][i % len(SYNONYMS[a])], SYNONYMS[b][i % len(SYNONYMS[b])]
        out.append((_fill(TEMPLATES[t], left, right), a, b))
    return out


def _matches(text: str) -> set[tuple[int, int, int]]:
    """Every ``(template index, left class, right class)`` reading of ``text`` (case and spacing ignored)."""
    key = " ".join(text.lower().split()).removesuffix(".")
    found = set()
    for t, pattern in enumerate(_PATTERNS):
        if m := pattern.fullmatch(key):
            found.add((t, _NOUNS[m["left"]], _NOUNS[m["right"]]))
    return found


def parse_pair_prompt(text: str) -> tuple[int, int] | None:
    """``(left_class, right_class)`` a prompt in any template (seen or held out) asks for, as indices into
    FASHION_MNIST_CLASSES; None if no template reads it, or two read it differently."""
    if not isinstance(text, str):
        raise InvalidInputError(f"prompt must be a string, got {type(text).__name__}")
    pairs = {(a, b) for _, a, b in _matches(text)}
    return pairs.pop() if len(pairs) == 1 else None


# The phrasings a text encoder learns to read the pairs from (``varied_captions``): not the six seen sentences but a
# small grammar that has them all as instances. Each item gets a clause: its noun (with or without an article) and a
# side phrase after it, a side label before it ("left: a bag"), or nothing; clauses come in either order, joined by
# any joiner. A relative clause names one side ("a bag to the right of a coat"). A noun with no side is on the side
# the other noun is not; two bare nouns read left to right. Why: an encoder trained on six fixed strings learns where
# the nouns stand in them (24 % of held-out phrasings read right); one trained on the grammar has to learn how a side
# binds to the noun next to it, which is what a new phrasing keeps. Kept out: any caption a held-out template reads
# (``_matches``), and every word that only a held-out template has ("with", "its"), so HELD_OUT_TEMPLATES stay never
# seen; the grammar has no side phrase before a noun except the "left:" label.
_SIDES = ("left", "right")
_SIDE_AFTER = ("on the {s}", "to the {s}", "on the {s} side", "at the {s}")
_SIDE_RELATIVE = ("to the {s} of", "on the {s} of")
_JOINERS = (" and ", ", ", "; ", ", and ", " ")
_FILLER_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def _words(texts: tuple[str, ...]) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t.lower()))}


_HELD_OUT_ONLY_WORDS = frozenset(_words(HELD_OUT_TEMPLATES) - _words(SEEN_TEMPLATES))
# a made-up word is none of these: a filler "bag" or "left" would change what the caption says
_KNOWN_WORDS = frozenset(
    _words(TEMPLATES + _SIDE_AFTER + _SIDE_RELATIVE + _SIDES + FASHION_MNIST_CLASSES + ("a", "an"))
)


def _phrase(left: int, right: int, rng: np.random.Generator, fillers: float) -> tuple[str, int | None]:
    """A caption of the pair and the side it alone names (0 left, 1 right; None: it names both items)."""
    nouns = [str(rng.choice(SYNONYMS[c])).replace(" ", "\0") for c in (left, right)]  # one word: "ankle boot"

    def noun(k: int) -> str:
        return _article(nouns[k]) if rng.random() < 0.7 else nouns[k]

    def side(k: int, forms: tuple[str, ...]) -> str:
        return str(rng.choice(forms)).format(s=_SIDES[k])

    order = [0, 1] if rng.random() < 0.5 else [1, 0]
    form, only = int(rng.integers(6)), None
    if form == 0:  # both sides named after their nouns
        clauses = [f"{noun(k)} {side(k, _SIDE_AFTER)}" for k in order]
    elif form == 1:  # side labels
        clauses = [f"{_SIDES[k]}: {noun(k)}" for k in order]
    elif form == 2:  # relative: the first noun's side, relative to the second
        k = order[0]
        clauses = [f"{noun(k)} {side(k, _SIDE_RELATIVE)} {noun(1 - k)}"]
    elif form == 3:  # one side named, the other implied
        named = int(rng.integers(2))
        clauses = [f"{noun(k)} {side(k, _SIDE_AFTER)}" if k == named else noun(k) for k in order]
    elif form == 4:  # two bare nouns, left first
        clauses = [noun(0), noun(1)]
    else:  # one item alone: each side's noun read on its own, whatever is on the other side
        only = order[0]
        clauses = [f"{noun(only)} {side(only, _SIDE_AFTER)}" if rng.random() < 0.5 else f"{_SIDES[only]}: {noun(only)}"]
    words = str(rng.choice(_JOINERS)).join(clauses).split(" ")
    while rng.random() < fillers:  # words it never saw: an encoder must read around them
        filler = "".join(rng.choice(_FILLER_LETTERS, size=int(rng.integers(2, 6))))
        if filler in _KNOWN_WORDS:
            continue
        words.insert(int(rng.integers(len(words) + 1)), filler)
    return " ".join(words).replace("\0", " "), only


def varied_captions(pairs_N2: torch.Tensor, seed: int = 0, fillers: float = 0.3) -> tuple[list[str], torch.Tensor]:
    """A caption for each ``(left_class, right_class)`` row of ``pairs_N2`` from the grammar above (a pure function
    of ``seed``), never one a held-out template reads and never with a word only held-out templates have, and the
    ``[N, 2]`` classes each caption says: ``pairs_N2``, with -1 for the side of a caption that names one item
    (one in six). Each caption gets a made-up word (2-5 random letters) with probability ``fillers``, another with
    the same probability, and so on: a text encoder trained on them learns to read past words it does not know."""
    check_seed(seed)
    if pairs_N2.ndim != 2 or pairs_N2.shape[1] != 2:
        raise InvalidInputError(f"pairs_N2 must be [N, 2] (left, right class), got {tuple(pairs_N2.shape)}")
    if not 0 <= fillers < 1:
        raise InvalidInputError(f"fillers must be a probability in [0, 1), got {fillers!r}")
    rng = np.random.default_rng(seed_of(seed))
    held = set(range(len(SEEN_TEMPLATES), len(TEMPLATES)))
    out, slots_N2 = [], pairs_N2.clone()
    for n, (a, b) in enumerate(pairs_N2.tolist()):
        while True:
            text, only = _phrase(a, b, rng, fillers)
            if _HELD_OUT_ONLY_WORDS.isdisjoint(re.findall(r"[a-z]+", text)) and not any(
                t in held for t, _, _ in _matches(text)
            ):
                break
        out.append(text)
        if only is not None:
            slots_N2[n, 1 - only] = -1
    return out, slots_N2


_NOUN_RE = re.compile(rf"\b({_NOUN_CHOICE})\b", re.IGNORECASE)


def noun_spans(text: str, said: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """``(start, end, side, class)`` of each class noun in caption ``text`` (its characters ``text[start:end]``,
    longest noun first: "ankle boot", not "boot"), where ``said`` is the ``(left, right)`` classes the caption says
    (-1 for a side it does not name, as ``varied_captions`` gives them): side 0 (left) or 1 (right), or -1 when
    both sides hold that class and the noun alone cannot tell which. The word labels a text encoder can be taught
    to carry on each noun (``train.text_encoder.train_slots``'s ``spans``)."""
    if len(said) != 2:
        raise InvalidInputError(f"said must be (left, right) classes, -1 for a side not named; got {said!r}")
    left, right = said
    out = []
    for m in _NOUN_RE.finditer(text):
        c = _NOUNS[m.group(1).lower()]
        if c not in (left, right):
            raise InvalidInputError(f"caption {text!r} names {m.group(1)!r}, not a class it says ({left}, {right})")
        out.append((m.start(), m.end(), -1 if left == right else (0 if c == left else 1), c))
    return out


def _check_pair_args(kind: str, seed: int, num: int | None, channels: int) -> None:
    _pairs_and_templates(kind)
    check_seed(seed)
    if num is not None:
        check_size(num, "num")
    check_channels(channels)


class FashionPairs(torch.utils.data.Dataset):
    """``num`` captioned canvases of two Fashion-MNIST ``items`` side by side (see ``fashion_pairs``).

    Canvas ``i`` holds item ``left_item_N[i]`` (class ``left_label_N[i]``) in its left half and ``right_item_N[i]``
    in its right half, captioned by template ``template_N[i]``. Everything is drawn at construction from ``seed``:
    a pair of ``kind`` uniformly, then an item of each class, a template and a noun per class uniformly.
    """

    class_names = FASHION_MNIST_CLASSES

    def __init__(
        self,
        items: TensorImageDataset,
        kind: str = "all",
        seed: int = 0,
        num: int | None = None,
        channels: int = 1,
        wide: bool = False,
    ):
        _check_pair_args(kind, seed, num, channels)
        if not isinstance(wide, bool):
            raise InvalidInputError(f"wide must be true or false, got {wide!r}")
        if items.class_names != FASHION_MNIST_CLASSES or items.channels != 1:
            raise InvalidInputError(
                f"items must be grey Fashion-MNIST; got {items.channels} channel(s), classes {items.class_names}"
            )
        self.items, self.kind, self.seed, self.channels, self.wide = items, kind, seed, channels, wide
        pairs, templates = _pairs_and_templates(kind)
        n = len(items) if num is None else num
        rng = np.random.default_rng(seed_of(seed))
        pair_N2 = np.asarray(pairs)[rng.integers(len(pairs), size=n)]
        item_N2 = np.empty_like(pair_N2)
        labels_N = items.labels.numpy()
        for c in sorted({c for pair in pairs for c in pair}):
            of_class, at_N2 = np.flatnonzero(labels_N == c), pair_N2 == c
            if not len(of_class):
                raise InvalidInputError(f"items hold no {FASHION_MNIST_CLASSES[c]!r}, which kind {kind!r} needs")
            item_N2[at_N2] = rng.choice(of_class, size=int(at_N2.sum()))
        self.left_label_N, self.right_label_N = (torch.from_numpy(pair_N2[:, j].copy()) for j in (0, 1))
        self.left_item_N, self.right_item_N = (torch.from_numpy(item_N2[:, j].copy()) for j in (0, 1))
        self.template_N = torch.from_numpy(np.asarray(templates)[rng.integers(len(templates), size=n)])
        self.noun_N2 = torch.from_numpy(rng.integers(0, 2**16, size=(n, 2)))  # taken mod each class's noun count

    @property
    def image_size(self) -> int:
        """The canvas width (and its height unless ``wide``)."""
        return 2 * self.items.image_size

    @property
    def height(self) -> int:
        return self.items.image_size if self.wide else 2 * self.items.image_size

    @property
    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(len(self))]

    def caption(self, index: int) -> str:
        a, b = int(self.left_label_N[index]), int(self.right_label_N[index])
        k_left, k_right = (int(k) for k in self.noun_N2[index])
        left, right = SYNONYMS[a][k_left % len(SYNONYMS[a])], SYNONYMS[b][k_right % len(SYNONYMS[b])]
        return _fill(TEMPLATES[int(self.template_N[index])], left, right)

    def __len__(self) -> int:
        return len(self.template_N)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        index = range(len(self))[index]  # negative indices allowed; out of range -> IndexError
        s = self.items.image_size
        canvas_1HW = torch.zeros((1, self.height, 2 * s), dtype=torch.uint8)
        top = 0 if self.wide else s // 2  # square: items centred vertically, black bands above and below
        canvas_1HW[:, top : top + s, :s] = self.items.images[self.left_item_N[index]]
        canvas_1HW[:, top : top + s, s:] = self.items.images[self.right_item_N[index]]
        image_CHW = canvas_1HW.float().div_(127.5).sub_(1.0).expand(self.channels, -1, -1).contiguous()
        return image_CHW, self.caption(index)


def fashion_pairs(
    split: str = "train",
    size: int = 32,
    seed: int = 0,
    kind: str | None = None,
    num: int | None = None,
    channels: int = 1,
    root: str | Path | None = None,
    wide: bool = False,
) -> FashionPairs:
    """Captioned canvases of two Fashion-MNIST items side by side, e.g. "a bag to the right of a sandal".

    The canvas is square, ``size`` x ``size`` (``size`` even): the tokenizers, the VAR and LlamaGen configs and
    ``ImageFolder``'s crops all take one int ``image_size``, so square images are all training supports. Each half
    holds one item at ``size/2`` x ``size/2`` (``fashion_mnist(size=size // 2)``: size 64 gives the usual 28-in-32
    padding), centred vertically on black. ``wide``: a ``size/2`` x ``size`` canvas of just the two items (no
    bands), for models that take non-square images (Infinity's h/w templates: the text-to-image demo). Items come
    from the Fashion-MNIST ``split``: "train" for training, "test" for evaluation. ``kind`` picks the pairs and
    phrasings (see ``prompts``): "train" is always "seen", so HELD_OUT_PAIRS and HELD_OUT_TEMPLATES never appear in
    it; "test" defaults to "all". ``num`` canvases (default: one per item of the split) are a pure function of
    ``seed``. ``root``: the Fashion-MNIST files (see ``find_fashion_mnist``).
    """
    if split not in ("train", "test"):
        raise InvalidInputError(f"fashion_pairs split must be 'train' or 'test', got {split!r}")
    check_size(size, "size")
    if size % 2:
        raise InvalidInputError(f"size must be an even int >= 2 (two items of side size/2), got {size!r}")
    kind = kind or ("seen" if split == "train" else "all")
    if split == "train" and kind != "seen":
        raise InvalidInputError(f"the train split is always kind 'seen' (hold-outs stay out of training); got {kind!r}")
    _check_pair_args(kind, seed, num, channels)  # before reading 60,000 images
    return FashionPairs(fashion_mnist(split, root=root, size=size // 2), kind, seed, num, channels, wide)
