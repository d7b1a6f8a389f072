"""The report as a document: a list of blocks rendered twice, to Markdown and to HTML, so the
two never drift.

Text may hold `code` and **bold** spans; everything else is escaped.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    """A section title."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of text."""

    text: str


@dataclass(frozen=True)
class Note:
    """A caveat or an explanation in place of something missing (shown in italics)."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bullet list."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table; ``align`` holds ``l`` or ``r`` per column."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str = ""
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG beside the report."""

    src: str
    alt: str


@dataclass(frozen=True)
class Code:
    """A preformatted block (a config)."""

    text: str
    lang: str = ""


Block = Heading | Paragraph | Note | Bullets | Table | Image | Code


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The report as GitHub-flavoured Markdown."""
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Note):
            out += [f"*{block.text}*", ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            align = block.align or "l" * len(block.header)
            rule = ["---:" if a == "r" else "---" for a in align]
            out.append("| " + " | ".join(_md_cell(c) for c in block.header) + " |")
            out.append("| " + " | ".join(rule) + " |")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, Image):
            out += [f"![{block.alt}]({block.src})", ""]
        elif isinstance(block, Code):
            out += [f"```{block.lang}", block.text.rstrip("\n"), "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { background: #f6f8fa; padding: 0 0.2em; }
p.note { color: #555; }
""".strip()


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The report as one HTML page (images are the PNGs beside it)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_STYLE}\n</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Note):
            out.append(f'<p class="note"><em>{_inline_html(block.text)}</em></p>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_inline_html(item)}</li>" for item in block.items)
            out.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            align = block.align or "l" * len(block.header)
            out.append("<table>")
            if block.caption:
                out.append(f"<caption>{_inline_html(block.caption)}</caption>")
            cells = "".join(
                f'<th class="{a}">{_inline_html(c)}</th>'
                for a, c in zip(align, block.header, strict=True)
            )
            out.append(f"<thead><tr>{cells}</tr></thead><tbody>")
            for row in block.rows:
                cells = "".join(
                    f'<td class="{a}">{_inline_html(c)}</td>'
                    for a, c in zip(align, row, strict=True)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        elif isinstance(block, Image):
            src, alt = html.escape(block.src), html.escape(block.alt)
            out.append(f'<p><img src="{src}" alt="{alt}"></p>')
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
