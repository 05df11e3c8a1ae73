"""``jobs.prompt_quality.choose_setting``: how a guidance sweep picks a model's default (the t2i build)."""

from __future__ import annotations

import pytest

from nextscale.jobs.prompt_quality import choose_setting


def row(cfg: float, seen: float, fd: float, held: float = 0.0, images: int = 300) -> dict:
    return {
        "settings": {"cfg": cfg, "tau": 1.0, "seed": 0},
        "seen": {"images": images, "pair_accuracy": seen},
        "held-out-pairs": {"images": images, "pair_accuracy": held},
        "fd_ratio": fd,
    }


def test_within_one_standard_error_of_the_best_share_the_lowest_fd_wins():
    # The t2i demo's sweep: 83.7 % at cfg 5 is one image in a hundred above cfg 6's 82.7 % (standard error 2.1
    # points at 300 images), and cfg 6's FD is lower.
    rows = [row(3, 0.830, 146.3), row(4, 0.823, 142.7), row(5, 0.837, 138.8), row(6, 0.827, 129.1)]
    assert choose_setting(rows)["settings"]["cfg"] == 6


def test_a_share_outside_the_noise_is_not_traded_for_fd():
    rows = [row(1, 0.60, 100.0), row(6, 0.83, 150.0)]
    assert choose_setting(rows)["settings"]["cfg"] == 6
    # More images shrink the band: 2 points apart is noise at 300 images, not at 30,000.
    close = [row(5, 0.84, 150.0), row(6, 0.82, 120.0)]
    assert choose_setting(close)["settings"]["cfg"] == 6
    assert (
        choose_setting([row(5, 0.84, 150.0, images=30000), row(6, 0.82, 120.0, images=30000)])["settings"]["cfg"] == 5
    )


def test_only_the_named_kind_picks():
    rows = [row(3, 0.80, 150.0, held=0.90), row(6, 0.85, 140.0, held=0.40)]
    assert choose_setting(rows)["settings"]["cfg"] == 6
    assert choose_setting(rows, "held-out-pairs")["settings"]["cfg"] == 3


def test_an_empty_sweep_is_a_one_line_error():
    with pytest.raises(ValueError, match="no rows"):
        choose_setting([])
