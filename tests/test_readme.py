"""Every Python example of the README runs, and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks() -> list[tuple[str, str]]:
    """(section title, code) for every ```python block, in order."""
    blocks = []
    for section in re.split(r"^## ", README, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        blocks += [(title, code) for code in re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)]
    return blocks


BLOCKS = _python_blocks()
# `print(x)  # tensor([0, 0, 1])`: a comment that starts like a repr is the exact expected output.
EXPECTED_OUTPUT = re.compile(r"^print\(.*\)\s+# ((?:tensor\(|\[).*)$")


def test_the_readme_has_examples_in_every_api_section():
    titles = {title for title, _ in BLOCKS}
    assert {"Fused ops", "Affinity tracking and grouping", "SelectiveGroupUpdate", "Baselines"} <= titles


@pytest.mark.parametrize("title, code", BLOCKS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(BLOCKS)])
def test_readme_example(title: str, code: str):
    namespace: dict = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"README.md ({title})", "exec"), namespace)
    printed = iter(stdout.getvalue().splitlines())
    for line in code.splitlines():
        if not line.startswith("print("):
            continue
        output = next(printed)
        expected = EXPECTED_OUTPUT.match(line)
        if expected:
            assert output == expected.group(1), f"{line!r} printed {output!r}"
    if title == "SelectiveGroupUpdate":
        sel = namespace["sel"]
        assert sel.batches == 200 and sorted(sum(sel.groups, [])) == [0, 1, 2, 3]
        assert torch.isfinite(sel.affinity).all() and sel.affinity.abs().sum() > 0
