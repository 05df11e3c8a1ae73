"""Small line plots drawn with PIL (loss curves, latency against load) — no plotting library needed."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (800, 450),
    log_y: bool = False,
) -> Path:
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        d.text((20, 20), "no data", fill="black")
        img.save(path)
        return Path(path)
    fy = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(fy(p[1]) for p in pts), max(fy(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 80, W - 20, 40, H - 50

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (fy(y) - y0) / (y1 - y0) * (bottom - top))

    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 12), title, fill="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.text((5, bottom - (bottom - top) * i / 4 - 6), f"{10**yv if log_y else yv:.3g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        d.text((left + (right - left) * i / 4 - 10, bottom + 8), f"{xv:.3g}", fill="black")
    d.text(((left + right) // 2 - 40, bottom + 28), xlabel, fill="black")
    d.text((5, top - 30), ylabel, fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        good = [p for p in s if math.isfinite(p[1]) and (p[1] > 0 or not log_y)]
        if not good:
            continue
        line = [xy(x, y) for x, y in sorted(good)]
        d.line(line if len(line) > 1 else line * 2, fill=c, width=2)
        for px, py in line:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.text((left + 10, top + 6 + 14 * i), name, fill=c)
    img.save(path)
    return Path(path)
