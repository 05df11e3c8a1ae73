"""Training metrics as JSON lines, and a PNG plot of the loss curves (drawn with PIL, no plotting library)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nextscale.plot import line_plot


class MetricsLog:
    """Appends one JSON object per line. On resume, lines beyond the resumed step are dropped first, so the
    file describes exactly one history."""

    def __init__(self, path: str | Path, enabled: bool = True, truncate_after: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= truncate_after
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(
    metrics_path: str | Path, out_png: str | Path, keys: tuple[str, ...] = ("loss",), size: tuple[int, int] = (800, 450)
) -> Path:
    """Train and validation curves of ``keys`` against the step."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in read_metrics(metrics_path):
        for k in keys:
            if isinstance(r.get(k), (int, float)) and math.isfinite(r[k]):
                series.setdefault(f"{r.get('split', 'train')} {k}", []).append((r["step"], r[k]))
    return line_plot(
        series, out_png, title=Path(metrics_path).parent.name, xlabel="step", ylabel=", ".join(keys), size=size
    )
