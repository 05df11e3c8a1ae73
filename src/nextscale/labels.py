"""Class labels given as indices or names -> a LongTensor of class indices.

Names are matched case-insensitively, ignoring spaces, underscores and hyphens ("t-shirt/top" ==
"T_shirt/Top"); an unambiguous short form also matches ("t-shirt", "tshirt" and "top" -> "T-shirt/top").
``-1``, ``"null"`` or ``"unconditional"`` select the null class (unguided generation).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch

from nextscale.errors import InvalidInputError

Label = int | str
NULL_NAMES = ("null", "unconditional", "none")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def resolve_label(label: Label, num_classes: int, class_names: Sequence[str] = ()) -> int:
    if isinstance(label, bool):
        raise InvalidInputError(f"class label must be an int or a class name, got {label!r}")
    if isinstance(label, int):
        if label == -1:
            return num_classes
        if not 0 <= label < num_classes:
            raise InvalidInputError(
                f"class {label} is out of range: allowed 0..{num_classes - 1} (or -1 for unconditional)"
            )
        return label
    if isinstance(label, str):
        if re.fullmatch(r"\s*-?\d+\s*", label):
            return resolve_label(int(label), num_classes, class_names)
        key = _norm(label)
        if key in NULL_NAMES:
            return num_classes
        if not class_names:
            raise InvalidInputError(
                f"unknown class {label!r}: this model has no class names; use an index 0..{num_classes - 1}"
            )
        return _match_name(label, key, class_names, num_classes)
    raise InvalidInputError(f"class label must be an int or a class name, got {type(label).__name__}")


def _match_name(label: str, key: str, class_names: Sequence[str], num_classes: int) -> int:
    """Exact (normalised) name, else an unambiguous short form: one of a name's ``/``-separated alternatives
    ("top" for "T-shirt/top") or a prefix of it ("tshirt", "t-shirt", "sneak")."""
    names = [_norm(n) for n in class_names]
    if key in names:
        return names.index(key)
    hits = [i for i, n in enumerate(names) if key in n.split("/")]
    hits = hits or [i for i, n in enumerate(names) if any(part.startswith(key) for part in n.split("/"))]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise InvalidInputError(
            f"class {label!r} is ambiguous: it matches "
            f"{', '.join(repr(class_names[i]) for i in hits[:10])}; give more of the name"
        )
    if len(class_names) <= 50:
        shown = ", ".join(repr(n) for n in class_names)
    else:  # e.g. ImageNet's 1,000: the nearest names, not a wall of text
        close = difflib.get_close_matches(key, names, n=8, cutoff=0.5)
        shown = ", ".join(repr(class_names[names.index(c)]) for c in close) + f" ... ({len(class_names)} names)"
    raise InvalidInputError(f"unknown class {label!r}; allowed: {shown} or an index 0..{num_classes - 1}")


def resolve_labels(
    labels: Label | Sequence[Label] | torch.Tensor, num_classes: int, class_names: Sequence[str] = (), repeat: int = 1
) -> torch.Tensor:
    """Labels -> LongTensor [len(labels) * repeat] (each label repeated ``repeat`` times in a row)."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise InvalidInputError(f"num_images_per_label must be an int >= 1, got {repeat!r}")
    if isinstance(labels, torch.Tensor):
        labels = labels.reshape(-1).tolist()
    if isinstance(labels, (int, str)):
        labels = [labels]
    items = list(labels)
    if not items:
        raise InvalidInputError("no class labels given")
    ids = [resolve_label(x, num_classes, class_names) for x in items]
    return torch.tensor(ids, dtype=torch.long).repeat_interleave(repeat)
