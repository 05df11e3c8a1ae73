"""Class labels given as indices or names -> a LongTensor of class indices.

Names are matched case-insensitively, ignoring spaces, underscores and hyphens ("t-shirt/top" ==
"T_shirt/Top"). ``-1``, ``"null"`` or ``"unconditional"`` select the null class (unguided generation).
"""

from __future__ import annotations

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
            raise InvalidInputError(f"class {label} is out of range: allowed 0..{num_classes - 1} "
                                    f"(or -1 for unconditional)")
        return label
    if isinstance(label, str):
        if re.fullmatch(r"\s*-?\d+\s*", label):
            return resolve_label(int(label), num_classes, class_names)
        key = _norm(label)
        if key in NULL_NAMES:
            return num_classes
        table = {_norm(n): i for i, n in enumerate(class_names)}
        if key in table:
            return table[key]
        if not class_names:
            raise InvalidInputError(f"unknown class {label!r}: this model has no class names; use an index "
                                    f"0..{num_classes - 1}")
        shown = ", ".join(repr(n) for n in class_names[:12]) + (", ..." if len(class_names) > 12 else "")
        raise InvalidInputError(f"unknown class {label!r}; allowed: {shown} or an index 0..{num_classes - 1}")
    raise InvalidInputError(f"class label must be an int or a class name, got {type(label).__name__}")


def resolve_labels(labels: Label | Sequence[Label] | torch.Tensor, num_classes: int,
                   class_names: Sequence[str] = (), repeat: int = 1) -> torch.Tensor:
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
