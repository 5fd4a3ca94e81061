"""What every HTML report shares: one self-contained page (inline CSS, matplotlib figures as inline SVG with
text drawn as paths, no URL anywhere) and HTML escaping of every value that comes from data."""

from __future__ import annotations

import html
import io
import re

import numpy as np

from llm_training.fileio import GENERATOR_META

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5rem; color: #1d232a; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; border-bottom: 2px solid #d9e1ea; padding-bottom: 0.25rem; margin-top: 2.2rem; }
.sub { color: #5a6572; margin-top: 0; }
nav a { margin-right: 1rem; color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d9e1ea; padding: 0.25rem 0.6rem; text-align: right; vertical-align: top; }
th { background: #f1f5f9; }
td.l, th.l { text-align: left; }
code, td.tok { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; white-space: pre; }
.plot svg { max-width: 100%; height: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.note { color: #5a6572; font-size: 0.9rem; }
.fail { color: #b3261e; font-weight: 600; }
.ok { color: #1e7b34; font-weight: 600; }
"""

BLUE, GREY, RED = "#1f77b4", "#b8c2cc", "#d62728"


# ------------------------------------------------------------------------------------------ plumbing
def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(value: float, digits: int = 0) -> str:
    if isinstance(value, (int, np.integer)) or digits == 0:
        return f"{int(round(float(value))):,}"
    return f"{float(value):,.{digits}f}"


def figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def svg(fig, salt: str) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, DOCTYPE or metadata (they name URLs)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def table(
    header: list[str], rows: list[list[object]], left: tuple[int, ...] = (0,), raw: bool = False
) -> str:
    def cell(tag: str, i: int, value: object) -> str:
        cls = ' class="l"' if i in left else ""
        return f"<{tag}{cls}>{value if raw else esc(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, heading: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: ``sections`` are (anchor, title, body HTML); ``subtitle`` is HTML."""
    nav = "".join(f"<a href='#{key}'>{esc(name)}</a>" for key, name, _ in sections)
    body = "".join(
        f"<section id='{key}'><h2>{esc(name)}</h2>{html_}</section>" for key, name, html_ in sections
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        + GENERATOR_META
        + f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(heading)}</h1><p class='sub'>{subtitle}</p><nav>{nav}</nav>{body}</body></html>\n"
    )
