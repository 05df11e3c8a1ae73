"""Class labels by index or name: exact names, unambiguous short forms, and errors that list the valid names."""

from __future__ import annotations

import pytest

from nextscale.errors import InvalidInputError
from nextscale.labels import resolve_label, resolve_labels

from .helpers import FMNIST


@pytest.mark.parametrize(
    "name, index",
    [
        ("T-shirt/top", 0),
        ("t_shirt / TOP", 0),
        ("t-shirt", 0),
        ("tshirt", 0),
        ("T-Shirt", 0),
        ("top", 0),
        ("shirt", 6),
        ("ankle", 9),
        ("ankle-boot", 9),
        ("sneak", 7),
        ("7", 7),
        (-1, 10),
        ("unconditional", 10),
    ],
)
def test_names_and_unambiguous_short_forms(name, index):
    assert resolve_label(name, 10, FMNIST) == index


def test_ambiguous_and_unknown_names_say_what_is_allowed():
    with pytest.raises(InvalidInputError, match=r"class 's' is ambiguous: it matches 'Sandal', 'Shirt', 'Sneaker'"):
        resolve_label("s", 10, FMNIST)
    with pytest.raises(InvalidInputError) as e:
        resolve_label("trousers", 10, FMNIST)
    assert all(repr(n) in str(e.value) for n in FMNIST) and "or an index 0..9" in str(e.value)
    many = tuple(f"class number {i}" for i in range(1000))
    with pytest.raises(InvalidInputError, match=r"allowed: 'class number 12'.* \.\.\. \(1000 names\)"):
        resolve_label("class number 12x", 1000, many)


def test_labels_keep_the_order_given():
    assert resolve_labels([7, "bag", "tshirt"], 10, FMNIST).tolist() == [7, 8, 0]
