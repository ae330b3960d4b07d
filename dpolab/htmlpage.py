"""One self-contained HTML page from headings, text, tables and PNG figures.

Figures are embedded as base64 data URIs so the page is a single file that can be mailed or
opened from anywhere. Every builder returns an HTML fragment (str); :func:`page` joins them.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from dpolab import atomic

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.6em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def subplots(*args, figsize: tuple[float, float] | None = None, **kwargs):
    """(figure, axes) as pyplot.subplots gives them, for drawing into files only: matplotlib's
    own Figure on the Agg canvas, without pyplot, so no backend is chosen and no figure is
    kept open: a notebook's matplotlib is left as it was."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*args, **kwargs)


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Lay out `fig` and write it as a PNG to `path` (creating the folder)."""
    fig.tight_layout()
    with atomic.writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return path


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def para(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def image(path: str | Path, caption: str = "") -> str:
    """Embed a PNG file; the alt text names the file so a broken image is identifiable."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img alt="{html.escape(Path(path).name)}" '
            f'src="data:image/png;base64,{data}">{cap}</figure>')


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, Mapping):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "<p><em>(no rows)</em></p>"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, blocks: Iterable[str]) -> str:
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(blocks) + "</body></html>")


def write_page(path: str | Path, title: str, blocks: Iterable[str]) -> Path:
    """Write the page atomically (temp file + rename) and return its path."""
    return atomic.write_text(path, page(title, blocks))
