"""Training metrics as JSON lines, and a PNG plot of the loss curves (drawn with PIL, no plotting library)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


class MetricsLog:
    """Appends one JSON object per line. On resume, lines beyond the resumed step are dropped first, so the
    file describes exactly one history."""

    def __init__(self, path: str | Path, enabled: bool = True, truncate_after: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: str | Path, out_png: str | Path, keys: tuple[str, ...] = ("loss",),
                size: tuple[int, int] = (800, 450)) -> Path:
    """Train and validation curves of ``keys`` against the step."""
    recs = read_metrics(metrics_path)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in recs:
        for k in keys:
            if k in r and isinstance(r[k], (int, float)) and math.isfinite(r[k]):
                series.setdefault(f"{r.get('split', 'train')} {k}", []).append((r["step"], r[k]))
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    if not series:
        d.text((20, 20), "no data", fill="black")
        img.save(out_png)
        return Path(out_png)
    pts = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts) or 1
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 == y0:
        y1 = y0 + 1
    left, right, top, bottom = 70, W - 20, 30, H - 40

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / max(x1 - x0, 1e-9) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        d.text((5, xy(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    d.text((left, bottom + 10), f"step {x0:g}", fill="black")
    d.text((right - 80, bottom + 10), f"step {x1:g}", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    for i, (name, s) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        d.line([xy(x, y) for x, y in s] if len(s) > 1 else [xy(*s[0]), xy(*s[0])], fill=c, width=2)
        d.text((left + 10, top + 5 + 14 * i), name, fill=c)
    img.save(out_png)
    return Path(out_png)
