"""What every report page shares: the HTML skeleton, figures with captions in words, and a check that
no text of a figure is clipped.

The analysis, attention, bias and train reports build their pages from the run directory only (tables
and PNGs), so ``kscale report RUN_DIR`` can rebuild them at any time. Each figure is saved through
:func:`save_figure`, which refuses a figure whose title, labels or legend would be cut off at the
figure's edge (the bug behind "MD² by layer … heads poolec"), and writes a caption file beside the
PNG (``name.png.txt``) that :func:`figure_html` shows under the picture. Images are embedded as base64,
so a page is one file that opens from disk; ``tests/integration/test_report_pages.py`` opens every page in
headless Chromium and checks that no console error is raised and that every image decodes.
"""

from __future__ import annotations

import base64
import html
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px;line-height:1.4}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#f3f3f3}
img{max-width:100%} figure{display:inline-block;margin:8px;vertical-align:top;max-width:100%}
figcaption{font-size:13px;color:#333;max-width:640px}
.verdict{background:#f4f8ff;border-left:4px solid #3b6fd8;padding:8px 12px;font-size:15px}
.verdict li{margin:3px 0} .muted{color:#666;font-size:12px}
pre{background:#f6f6f6;padding:8px;font-size:11px;overflow:auto}"""

LEGEND_FONTSIZE = 9
TITLE_WIDTH = 60  # characters per title line before wrapping


def plt():
    """matplotlib.pyplot on the Agg backend (reports are written on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def wrap(title: str, width: int = TITLE_WIDTH) -> str:
    """A title broken into lines of at most ``width`` characters (long titles wrap, never clip)."""
    return "\n".join(textwrap.wrap(title, width)) if len(title) > width else title


def integer_ticks(ax: Any) -> None:
    """Integer-only ticks on the x axis (layers, heads, steps)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax: Any, **kw: Any) -> Any:
    """A legend to the right of the axes, outside the data."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     fontsize=LEGEND_FONTSIZE, frameon=False, **kw)


def clipped_texts(fig: Any, tolerance_px: float = 1.0) -> list[str]:
    """Texts of ``fig`` (titles, labels, tick labels, legends) drawn past the figure's edge; [] if none.

    Decided on the figure's tight bounding box (what is really drawn: ticks outside the view limits are
    not); the texts reaching past the edge are named for the message.
    """
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # inches -> pixels
    width, height = fig.bbox.width, fig.bbox.height
    if drawn.x0 >= -tolerance_px and drawn.y0 >= -tolerance_px and drawn.x1 <= width + tolerance_px \
            and drawn.y1 <= height + tolerance_px:
        return []
    out = []
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -tolerance_px or box.y0 < -tolerance_px or box.x1 > width + tolerance_px \
                or box.y1 > height + tolerance_px:
            out.append(text.get_text())
    return out or ["(an artist beyond the edge)"]


STRICT = False  # tests set it: a figure with clipped text then fails instead of being saved trimmed


def save_figure(fig: Any, path: Path, caption: str, dpi: int = 110) -> Path:
    """Lay out, check for clipped text, save the PNG and its caption (``path.png.txt``); closes ``fig``.

    The PNG is saved with a tight bounding box, so nothing is ever cut off in the picture; a title or
    legend that did not fit the laid-out figure raises when :data:`STRICT` is on (tests), so the
    drawing code gets fixed rather than silently trimmed. Off, the check (one more full draw) is skipped.
    """
    pyplot = plt()
    if fig.get_layout_engine() is None:  # figures drawn with layout="constrained" keep their engine
        try:
            fig.tight_layout()
        except (ValueError, RuntimeError):  # e.g. incompatible axes: the tight bounding box still applies
            pass
    clipped = clipped_texts(fig) if STRICT else []  # an extra full draw: only where a clip must fail
    if clipped:
        pyplot.close(fig)
        raise AssertionError(f"{path.name}: text cut off at the figure's edge: {clipped[:5]}")
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    pyplot.close(fig)
    Path(str(path) + ".txt").write_text(caption)
    return path


def caption_of(png: Path) -> str:
    """The caption written beside ``png`` by :func:`save_figure` (a sentence, not the file name)."""
    side = Path(str(png) + ".txt")
    return side.read_text() if side.exists() else png.stem.replace("_", " ")


def figure_html(png: Path, caption: str | None = None) -> str:
    """One embedded picture with its caption in words."""
    data = base64.b64encode(png.read_bytes()).decode()
    text = caption if caption is not None else caption_of(png)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(text[:80])}">'
            f"<figcaption>{html.escape(text)}</figcaption></figure>")


def figures_html(pngs: Iterable[Path]) -> str:
    return "".join(figure_html(p) for p in pngs)


def verdict_html(sentences: list[str], title: str = "Verdict") -> str:
    """The verdict box at the top of a page: one short paragraph per item (already HTML-escaped)."""
    items = "".join(f"<li>{s}</li>" for s in sentences)
    return f'<div class="verdict"><b>{html.escape(title)}</b><ul>{items}</ul></div>'


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML page."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>'
            f"{body}</body></html>")


def table_html(df: Any, float_format: str = "{:.4g}", **kw: Any) -> str:
    """A pandas table with short numbers and blanks for missing values."""
    return df.to_html(index=kw.pop("index", False), float_format=lambda v: float_format.format(v), na_rep="",
                      border=0, **kw)


def fmt(value: float, digits: int = 3) -> str:
    """A number for a sentence: 3 significant digits, "n/a" when missing."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"
