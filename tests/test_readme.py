"""Every Python example of the README and of the manual (docs/) runs, and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The front page and the manual's pages, as paths relative to the repository.
PAGES = ["README.md", *sorted(str(page.relative_to(ROOT)) for page in (ROOT / "docs").rglob("*.md"))]


def _python_blocks() -> list[tuple[str, str, str]]:
    """(page, section title, code) for every ```python block of every page, in order.

    A section starts at a `# ` or `## ` heading outside code blocks (a comment line inside one is no heading).
    """
    blocks = []
    for page in PAGES:
        title, fence, code = "", None, []
        for line in (ROOT / page).read_text().splitlines():
            if fence is None and line.startswith("```"):
                fence, code = line, []
            elif fence is not None and line == "```":
                if fence == "```python":
                    blocks.append((page, title, "\n".join(code) + "\n"))
                fence = None
            elif fence is not None:
                code.append(line)
            elif re.match(r"#{1,2} ", line):
                title = line.lstrip("#").strip()
    return blocks


BLOCKS = _python_blocks()
# `print(x)  # tensor([0, 0, 1])`: a comment that starts like a repr is the exact expected output.
EXPECTED_OUTPUT = re.compile(r"^print\(.*\)\s+# ((?:tensor\(|\[).*)$")


def test_the_pages_have_examples_where_the_api_is_described():
    pages = {page for page, _, _ in BLOCKS}
    assert {"docs/fused-ops.md", "docs/affinity.md", "docs/selective.md", "docs/baselines.md"} <= pages
    assert {"docs/scaling.md", "docs/bench.md", "docs/training.md"} <= pages
    assert ("README.md", "The training step") in {(page, title) for page, title, _ in BLOCKS}


def test_the_readme_links_to_files_that_exist():
    # The README is not part of the site, so `mkdocs build --strict` does not check its links.
    readme = (ROOT / "README.md").read_text()
    targets = {target.split("#")[0] for target in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", readme)}
    missing = sorted(target for target in targets if target and not (ROOT / target).exists())
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.parametrize("page, title, code", BLOCKS, ids=[f"{p}-{t}-{i}" for i, (p, t, _) in enumerate(BLOCKS)])
def test_example(page: str, title: str, code: str):
    namespace: dict = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"{page} ({title})", "exec"), namespace)
    printed = iter(stdout.getvalue().splitlines())
    for line in code.splitlines():
        if not line.startswith("print("):
            continue
        output = next(printed)
        expected = EXPECTED_OUTPUT.match(line)
        if expected:
            assert output == expected.group(1), f"{line!r} printed {output!r}"
    if page == "docs/selective.md":  # its one example: 200 batches of a 4-task network
        sel = namespace["sel"]
        assert sel.batches == 200 and sorted(sum(sel.groups, [])) == [0, 1, 2, 3]
        assert torch.isfinite(sel.affinity).all() and sel.affinity.abs().sum() > 0
