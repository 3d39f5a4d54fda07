"""A Report as Markdown (images as files next to it) and as one self-contained HTML page (images as
base64 data URIs, inline CSS, and a Content-Security-Policy that lets it load nothing from outside);
blocks on their own as Markdown or as plain text for a terminal (core/report/summary.py).

Every value that reaches the page is escaped: config values and reasons are user text.
"""

from __future__ import annotations

import base64
import html
import re

from trainflow.core.report.blocks import Block, Code, Image, Report, Table, Text

BOLD = re.compile(r"\*\*(.+?)\*\*")
RIGHT = ' style="text-align: right"'
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 75rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; vertical-align: top; }
td { overflow-wrap: anywhere; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; font-size: .85rem; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { font-size: .85rem; color: #555; }
nav a { margin-right: .8rem; }
"""


def render_markdown(report: Report, image_dir: str) -> str:
    """Markdown; each image is `<image_dir>/<name>.png`, a path relative to the Markdown file."""
    parts = [f"# {_md(report.title)}\n"]
    for section in report.sections:
        parts.append(f"## {_md(section.title)}\n")
        parts += [_md_block(block, image_dir) for block in section.blocks]
    return "\n".join(parts)


def markdown_blocks(blocks: list[Block], image_dir: str = "report_files") -> str:
    """Blocks as Markdown, one after the other (no title)."""
    return "\n".join(_md_block(block, image_dir) for block in blocks)


def render_text(blocks: list[Block]) -> str:
    """Blocks as plain text for a terminal: paragraphs as lines, tables as aligned columns, no markup."""
    return "\n".join(_text_block(block) for block in blocks)


def render_html(report: Report) -> str:
    """One HTML page that needs nothing else to be viewed."""
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{_esc(s.title)}</a>' for s in report.sections)
    body = [f"<h1>{_esc(report.title)}</h1>", f"<nav>{nav}</nav>"]
    for section in report.sections:
        body.append(f'<section id="{_anchor(section.title)}"><h2>{_esc(section.title)}</h2>')
        body += [_html_block(block) for block in section.blocks]
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        f"<title>{_esc(report.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def image_file(image: Image) -> str:
    return f"{image.name}.png"


def _md_block(block: Block, image_dir: str) -> str:
    if isinstance(block, Text):
        return _md(block.text) + "\n"
    if isinstance(block, Table):
        header = "| " + " | ".join(_md_cell(h) for h in block.header) + " |\n"
        rule = "|" + "".join("---:|" if block.right(i) else "---|" for i in range(len(block.header))) + "\n"
        return header + rule + "".join("| " + " | ".join(_md_cell(c) for c in row) + " |\n" for row in block.rows)
    if isinstance(block, Image):
        return f"![{_md(block.caption)}]({image_dir}/{image_file(block)})\n"
    fence = "`" * max(3, _longest_backtick_run(block.text) + 1)
    return f"**{_md(block.title)}**\n\n{fence}{block.language}\n{block.text.rstrip()}\n{fence}\n"


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):

        def cells(tag: str, row: list[str]) -> str:
            return "".join(f"<{tag}{RIGHT if block.right(i) else ''}>{_inline(c)}</{tag}>" for i, c in enumerate(row))

        head = cells("th", block.header)
        rows = "".join(f"<tr>{cells('td', row)}</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        caption = _esc(block.caption)
        img = f'<img src="data:image/png;base64,{data}" alt="{caption}">'
        return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"
    assert isinstance(block, Code)
    return f"<details><summary>{_esc(block.title)}</summary><pre>{_esc(block.text)}</pre></details>"


def _text_block(block: Block) -> str:
    if isinstance(block, Text):
        return _plain(block.text)
    if isinstance(block, Table):
        lines = [block.header, *block.rows]
        widths = [max(len(_plain(line[i])) for line in lines) for i in range(len(block.header))]
        return "\n".join(
            "  ".join(_plain(cell).rjust(width) if block.right(i) else _plain(cell).ljust(width)
                      for i, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip()
            for line in lines
        )  # fmt: skip
    if isinstance(block, Image):
        return f"[image: {block.caption}]"
    return f"{block.title}:\n{block.text.rstrip()}"


def _plain(text: str) -> str:
    return BOLD.sub(r"\1", text)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _inline(text: str) -> str:
    """Escaped text with `**bold**` (the compression table marks its recommended row so) as <strong>."""
    return BOLD.sub(r"<strong>\1</strong>", _esc(text))


def _md(text: str) -> str:
    """Text that Markdown shows as written: no raw HTML, no links made from values."""
    return text.replace("<", "\\<").replace("[", "\\[").replace("]", "\\]")


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)
