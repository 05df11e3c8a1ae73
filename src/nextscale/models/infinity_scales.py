"""Infinity's scale schedules (h/w templates x total-pixel presets) and its 2-D rotary position table.

Mirrors ``infinity/utils/dynamic_resolution.py`` and ``precompute_rope2d_freqs_grid`` (``basic.py:38-93``) of the
official code: 8 aspect ratios plus their inverses give 15 templates (in the official dict order); each template
has four schedules ('0.06M', '0.25M', '0.60M', '1M' = its first 7/10/12/13 token grids). A token is 16x16 pixels
in both releases; nextscale adds '0.04M' (the first 6 grids) for small models, and a tokenizer with a smaller token
stride (``BSQVAEConfig.token_stride``) makes proportionally smaller images from the same grids.

RoPE-2D as released (``rope2d_normalized_by_hw=2``): the token at row i of an h x w scale sits at row
``round(i * H/h)`` of the template's 1M grid H x W (float32 product, round half to even), and likewise for
columns; its angles come from a 128 x 128 table (2048 px / 16).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

from nextscale.config import PN_SCALES
from nextscale.errors import ConfigError, InvalidInputError

TOKEN_STRIDE = 16  # pixels per token side (vae_stride in dynamic_resolution.py)
ROPE_GRID = 2048 // 16  # side of the RoPE angle table (max_height = max_width in basic.py:38)
ROPE_BASE = 10000.0
ROPE_PAD = 128  # load_infinity's pad_to_multiplier: the official table is zero-padded to a multiple of it

# dynamic_resolution.py:6-15: h/w ratio -> "h,w" token grids, coarse to fine.
_RATIO2HWS_TEXT = {
    1.000: "1,1 2,2 4,4 6,6 8,8 12,12 16,16 20,20 24,24 32,32 40,40 48,48 64,64",
    1.250: "1,1 2,2 3,3 5,4 10,8 15,12 20,16 25,20 30,24 35,28 45,36 55,44 70,56",
    1.333: "1,1 2,2 4,3 8,6 12,9 16,12 20,15 24,18 28,21 36,27 48,36 60,45 72,54",
    1.500: "1,1 2,2 3,2 6,4 9,6 15,10 21,14 27,18 33,22 39,26 48,32 63,42 78,52",
    1.750: "1,1 2,2 3,3 7,4 11,6 14,8 21,12 28,16 35,20 42,24 56,32 70,40 84,48",
    2.000: "1,1 2,2 4,2 6,3 10,5 16,8 22,11 30,15 38,19 46,23 60,30 74,37 90,45",
    2.500: "1,1 2,2 5,2 10,4 15,6 20,8 25,10 30,12 40,16 50,20 65,26 80,32 100,40",
    3.000: "1,1 2,2 6,2 9,3 15,5 21,7 27,9 36,12 45,15 54,18 72,24 90,30 111,37",
}


def _full_ratio2hws() -> dict[float, tuple[tuple[int, int], ...]]:
    # dynamic_resolution.py:18-22: each ratio, then its inverse keyed int(1/r*1000)/1000 (0.8, 0.75, 0.666, ...).
    out: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio, text in _RATIO2HWS_TEXT.items():
        hws = tuple((int(h), int(w)) for h, w in (pair.split(",") for pair in text.split()))
        out[ratio] = hws
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


_TEMPLATE_GRIDS = _full_ratio2hws()
H_DIV_W_TEMPLATES: tuple[float, ...] = tuple(_TEMPLATE_GRIDS)  # the official h_div_w_templates, same order


@dataclass(frozen=True)
class InfinitySchedule:
    """One template's schedule: ``grids[si] = (h, w)`` tokens of scale si (the official ``(1, h, w)`` with t=1)."""

    template: float
    pn: str
    grids: tuple[tuple[int, int], ...]
    stride: int = TOKEN_STRIDE  # pixels per token side (the tokenizer's ``token_stride``)

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @property
    def seq_len(self) -> int:
        return sum(self.lengths)

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, b = [], 0
        for n in self.lengths:
            out.append((b, b + n))
            b += n
        return tuple(out)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        h, w = self.grids[-1]
        return h * self.stride, w * self.stride

    def scale_schedule(self) -> list[tuple[int, int, int]]:
        """The official ``scale_schedule`` argument, ``[(1, h, w), ...]``."""
        return [(1, h, w) for h, w in self.grids]

    def vae_grids(self, patchify: bool) -> tuple[tuple[int, int], ...]:
        """Latent grids of the tokenizer: with spatial patchify (8B, f8 VAE) a token is 2x2 latent pixels."""
        f = 2 if patchify else 1
        return tuple((h * f, w * f) for h, w in self.grids)


Size = tuple[int, int] | str  # (height, width) pixels, 'WIDTHxHEIGHT' or 'W:H'


def parse_size(size: Size | None) -> tuple[float, tuple[int, int] | None]:
    """``size`` -> (height / width, the pixel size asked for or None). ``(h, w)`` in pixels; ``"1024x576"`` is
    width x height (OpenAI's convention); ``"16:9"`` an aspect ratio, width:height. None: square."""
    if size is None:
        return 1.0, None
    if isinstance(size, str):
        text = size.strip().lower()
        m = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", text)
        if m:
            w, h = int(m.group(1)), int(m.group(2))
            return _ratio(h, w, size), (h, w)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)", text)
        if m:
            w_f, h_f = float(m.group(1)), float(m.group(2))
            if w_f <= 0 or h_f <= 0:
                raise InvalidInputError(f"aspect ratio {size!r} must be positive, e.g. '16:9'")
            return h_f / w_f, None
        raise InvalidInputError(
            f"size must be (height, width) pixels, 'WIDTHxHEIGHT' like '1024x576' or an aspect ratio like '16:9', "
            f"got {size!r}"
        )
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        return _ratio(size[0], size[1], size), (int(size[0]), int(size[1]))
    raise InvalidInputError(f"size must be (height, width) in pixels, 'WIDTHxHEIGHT' or 'W:H', got {size!r}")


def _ratio(h: int, w: int, given: Any) -> float:
    if not (1 <= h <= 16384 and 1 <= w <= 16384):
        raise InvalidInputError(f"size {given!r}: height and width must be 1..16384 pixels")
    return h / w


def nearest_template(h_div_w: float) -> float:
    """``h_div_w_templates[argmin |templates - h_div_w|]`` (the first one on a tie, as numpy's argmin)."""
    if not h_div_w > 0 or h_div_w == float("inf"):
        raise ConfigError(f"h_div_w must be a positive finite number, got {h_div_w!r}")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def schedule(h_div_w: float, pn: str = "1M", stride: int = TOKEN_STRIDE) -> InfinitySchedule:
    """The schedule of the template nearest to ``h_div_w`` with ``pn`` total pixels (at 16 px per token; ``stride``:
    the tokenizer's pixels per token)."""
    if pn not in PN_SCALES:
        raise ConfigError(f"pn must be one of {', '.join(PN_SCALES)}, got {pn!r}")
    template = nearest_template(h_div_w)
    return InfinitySchedule(template, pn, _TEMPLATE_GRIDS[template][: PN_SCALES[pn]], stride)


def image_schedule(height: int, width: int, pn: str, stride: int) -> InfinitySchedule:
    """The schedule whose last grid makes ``height`` x ``width`` pixel images (its aspect template at ``pn``)."""
    sched = schedule(height / width, pn, stride)
    if sched.image_size != (height, width):
        h, w = sched.image_size
        raise ConfigError(
            f"images are {height}x{width} px; the pn {pn} schedule of their aspect template makes {h}x{w} px at "
            f"{stride} px per token: pick --pn or --image-size"
        )
    return sched


def template_sizes(pn: str, stride: int = TOKEN_STRIDE) -> dict[str, InfinitySchedule]:
    """'WIDTHxHEIGHT' (pixels, OpenAI's order) -> schedule, for every template at ``pn``, in template order."""
    out = {}
    for t in H_DIV_W_TEMPLATES:
        s = schedule(t, pn, stride)
        h, w = s.image_size
        out[f"{w}x{h}"] = s
    return out


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 4 or head_dim % 4:
        raise ConfigError(f"RoPE-2D needs a head dim divisible by 4 (half for rows, half for columns), got {head_dim}")


@functools.lru_cache(maxsize=4)
def _angle_grid(head_dim: int) -> torch.Tensor:
    """cos/sin of the 128 x 128 angle table, [2, 128, 128, head_dim/2], computed as basic.py:40-52.

    The same op sequence on the same shapes matters: cos/sin are vectorised (SLEEF) except in a loop's scalar
    tail, so elements are computed in blocks whose lengths are multiples of the vector width."""
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    t = torch.arange(ROPE_GRID, dtype=torch.int64).type_as(inv_freq)
    f_h, f_w = torch.outer(t, inv_freq), torch.outer(t, inv_freq)
    grid = torch.cat(
        [f_h[:, None, :].expand(-1, ROPE_GRID, -1), f_w[None, :, :].expand(ROPE_GRID, -1, -1)], dim=-1
    ).contiguous()
    flat = grid.view(-1)
    cos, sin = torch.empty_like(flat), torch.empty_like(flat)
    block = 16384  # below the parallel grain size: every element takes the vectorised path, whatever the threads
    for b in range(0, flat.numel(), block):
        torch.cos(flat[b : b + block], out=cos[b : b + block])
        torch.sin(flat[b : b + block], out=sin[b : b + block])
    return torch.stack([cos.view_as(grid), sin.view_as(grid)])


def rope2d_positions(template: float) -> torch.Tensor:
    """Grid positions [L_1M, 2] (row, col) of every token of the template's '1M' schedule (normalized_by_hw=2)."""
    grids = _TEMPLATE_GRIDS[template]
    uph, upw = grids[-1]
    out = []
    for ph, pw in grids:
        idx = torch.stack(
            [
                (torch.arange(ph) * (uph / ph)).reshape(ph, 1).expand(ph, pw),
                (torch.arange(pw) * (upw / pw)).reshape(1, pw).expand(ph, pw),
            ],
            dim=-1,
        )
        out.append(idx.round().int().reshape(-1, 2))
    return torch.cat(out)


@functools.lru_cache(maxsize=16)
def rope2d_table(head_dim: int, template: float) -> torch.Tensor:
    """[2, L_pad, head_dim/2] (cos, sin) of every position of the template's 1M schedule, zero-padded to a multiple
    of 128 rows as the official table. Every schedule of a template is a prefix of its 1M schedule, so a token's
    rows are at its offset in the sequence (``scale_ind`` offset, basic.py:103-109)."""
    _check_head_dim(head_dim)
    if template not in _TEMPLATE_GRIDS:
        raise ConfigError(f"unknown h/w template {template!r}; known: {', '.join(map(str, H_DIV_W_TEMPLATES))}")
    pos = rope2d_positions(template)
    table = _angle_grid(head_dim)[:, pos[:, 0], pos[:, 1], :]
    if table.shape[1] % ROPE_PAD:
        table = torch.cat([table, table.new_zeros(2, ROPE_PAD - table.shape[1] % ROPE_PAD, head_dim // 2)], dim=1)
    return table


def rope2d_rows(head_dim: int, sched: InfinitySchedule, begin: int, end: int) -> torch.Tensor:
    """Rows ``begin:end`` of the schedule's RoPE table, [2, end-begin, head_dim/2] (cos, sin)."""
    table = rope2d_table(head_dim, sched.template)
    if not 0 <= begin <= end <= table.shape[1]:
        raise ConfigError(f"RoPE rows {begin}:{end} outside the table of {table.shape[1]} positions")
    return table[:, begin:end]


def scale_rope(head_dim: int, sched: InfinitySchedule, si: int) -> torch.Tensor:
    """RoPE rows of the tokens of scale ``si``, [2, h*w, head_dim/2]."""
    b, e = sched.begin_ends[si]
    return rope2d_rows(head_dim, sched, b, e)
