r"""The HTML page beside every Markdown report (apl-eval, apl-bench): the same blocks, tables as tables.

Only what the reports write is understood: ``#`` headings, pipe tables, ``![alt](src)`` images and paragraphs.

>>> page = markdown_to_html("# t\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![grid](grid.png)", "r")
>>> print(*page.splitlines()[1:], sep="\n")
<h1>t</h1>
<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>
<img src="grid.png" alt="grid">
"""

from __future__ import annotations

import html
import re

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
STYLE = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"


def markdown_to_html(markdown: str, title: str) -> str:
    """A self-contained page of the report's Markdown (images stay files next to it)."""
    body = []
    for block in markdown.strip().split("\n\n"):
        if block.startswith("|"):
            rows = [line.strip().strip("|").split("|") for line in block.splitlines() if not line.startswith("|---")]
            body.append(
                "<table>"
                + "".join(
                    "<tr>" + "".join(f"<{tag}>{html.escape(cell.strip())}</{tag}>" for cell in row) + "</tr>"
                    for tag, row in ((("th" if i == 0 else "td"), row) for i, row in enumerate(rows))
                )
                + "</table>"
            )
        elif block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            body.append(f"<h{level}>{html.escape(block.lstrip('# '))}</h{level}>")
        elif match := _IMAGE.match(block.strip()):
            body.append(f'<img src="{html.escape(match["src"])}" alt="{html.escape(match["alt"])}">')
        else:
            body.append("<p>" + html.escape(block).replace("\n", "<br>") + "</p>")
    head = f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
    return head + "\n" + "\n".join(body) + "\n"
