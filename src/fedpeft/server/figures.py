"""Shared figure and HTML helpers of fedpeft's reports (a run's ``report.html``, ``fedpeft compare``).

* matplotlib is used with the non-interactive ``Agg`` backend (no display needed, nothing
  opens a window) and without its one-time "Matplotlib is building the font cache" line:
  the first import on a fresh machine builds the cache quietly (:func:`_quiet_pyplot`);
* :func:`save_figure` writes a PNG and frees the figure;
* :func:`html_figure` embeds a PNG as a base64 ``data:`` URI, so a report is one
  self-contained file that opens anywhere, also offline and after the PNGs were moved;
* :func:`html_table`, :func:`fmt` and :func:`html_page` build the rest of the page.

Importing this module imports matplotlib (~0.5 s): the round loop imports it only when it
writes the report, after the last round.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["STYLE", "fmt", "html_figure", "html_page", "html_table", "plt", "save_figure"]


def _quiet_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; the font-cache warning (matplotlib logs it
    from a timer while it builds the cache on first use) is held back during the import."""
    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    finally:
        font_log.setLevel(level)
    return pyplot


plt = _quiet_pyplot()

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
         "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;color:#555}"
         ".note{color:#555;font-size:13px}")


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (tight layout, 110 dpi), close it, return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(v: Any) -> str:
    """A table cell: floats with 4 significant digits, ``inf`` as such, NaN and None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.4g}")
    return str(v)


def html_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """An HTML table of ``rows`` (dicts) with one column per name in ``cols``, cells escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_figure(path: Path, caption: str = "") -> str:
    """``<figure>`` with the PNG at ``path`` embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption or path.stem)}</figcaption></figure>")


def html_page(title: str, body: str) -> str:
    """A complete self-contained page (no external resource): ``title`` and ``body`` HTML."""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
