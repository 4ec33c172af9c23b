"""Plots for the HTML reports, drawn with matplotlib (the optional `report` extra) as base64 PNG.

Every function returns the PNG's base64 text, or None when matplotlib is not installed (the page then shows
its tables and a note). matplotlib is used through `Figure` objects only (no pyplot global state), with the
Agg canvas, so nothing opens a window and drawing is safe in any thread.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections.abc import Sequence

INSTALL_HINT = "pip install 'merge-cli[report]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def preload() -> None:
    """Import matplotlib's figure, tick and Agg modules on a daemon thread (about 1.4 s of CPU, once per
    process), so a merge that ends by drawing merge_report.html does it while the tensors stream instead
    of after them. Without matplotlib it does nothing."""

    def work():
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
            import matplotlib.ticker  # noqa: F401
        except Exception:  # noqa: BLE001 - the page says what is missing when it is drawn
            pass

    threading.Thread(target=work, name="merge-cli-plots-import", daemon=True).start()


def _figure(width: float = 7.0, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.88)
    return fig, fig.subplots()


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _clean(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def line(
    title: str,
    x: Sequence[int],
    series: dict[str, Sequence[float | None]],
    ylabel: str,
    xlabel: str = "layer",
    percent: bool = False,
) -> str | None:
    """One line per series over x (layers); None values leave gaps."""
    if not available() or not x or not series:
        return None
    fig, ax = _figure()
    for label, ys in series.items():
        ys = _clean(ys)
        ax.plot(list(x), [100 * v for v in ys] if percent else ys, marker="o", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _png(fig)


def heatmap(
    title: str,
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    label: str,
    percent: bool = False,
    cmap: str = "viridis",
) -> str | None:
    """values[r][c] as colours (blank where None), with a colour bar; cells annotated when few."""
    if not available() or not rows or not cols:
        return None
    import numpy as np

    data = np.array([_clean(r) for r in values], dtype=float)
    if percent:
        data = data * 100
    fig, ax = _figure(7.0, max(1.6, 0.35 * len(rows) + 1.2))
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    step = max(1, len(cols) // 24)
    ax.set_xticks(range(0, len(cols), step), labels=list(cols)[::step])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label + (" (%)" if percent else ""))
    if len(rows) * len(cols) <= 60:
        for r in range(len(rows)):
            for c in range(len(cols)):
                if not math.isnan(data[r, c]):
                    red, green, blue, _ = im.cmap(im.norm(data[r, c]))
                    ink = "k" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "w"
                    ax.text(c, r, f"{data[r, c]:.2g}", ha="center", va="center", fontsize=7, color=ink)
    return _png(fig)


def bars(
    title: str,
    categories: Sequence[str],
    series: dict[str, Sequence[float | None]],
    ylabel: str,
    percent: bool = False,
) -> str | None:
    """Grouped bars: one group per category, one bar per series."""
    if not available() or not categories or not series:
        return None
    fig, ax = _figure()
    width = 0.8 / len(series)
    for k, (label, ys) in enumerate(series.items()):
        ys = [0.0 if math.isnan(v) else v for v in _clean(ys)]
        ax.bar(
            [i + k * width for i in range(len(categories))],
            [100 * v for v in ys] if percent else ys,
            width,
            label=label,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], labels=list(categories))
    ax.set_title(title)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _png(fig)
