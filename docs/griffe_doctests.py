"""Griffe extension of the API pages: the docstrings' doctest examples rendered as code.

The package's docstrings hold their examples as bare doctest blocks (``>>>`` lines and their
output, run by ``pytest --doctest-modules``). Markdown would read such a block as a paragraph,
and an output such as ``['pcgrad', 'cagrad']`` as a link; here every doctest block at the
docstring's own indentation is fenced as ``pycon``. Blocks indented under an ``Example::`` line
are already Markdown code blocks and are left alone.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wraps each unindented doctest block (from a ``>>>`` line to the next blank line) in a fence."""
    lines, fenced, in_block = text.split("\n"), [], False
    for line in lines:
        if not in_block and line.startswith(">>>"):
            fenced.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            fenced.append("```")
            in_block = False
        fenced.append(line)
    if in_block:
        fenced.append("```")
    return "\n".join(fenced)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
