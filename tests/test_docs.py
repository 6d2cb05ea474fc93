"""The code the docs show runs: the Python blocks marked ``<!-- tested ... -->`` in a page."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKED_BLOCK = re.compile(r"<!-- tested[^>]*-->\s*```python\n(.*?)```", re.S)


def marked_blocks(page: str) -> list[str]:
    return MARKED_BLOCK.findall((DOCS / page).read_text())


@pytest.mark.parametrize("page", ["quickstart.md"])
def test_the_marked_blocks_of_a_page_run_in_order(page, capsys):
    blocks = marked_blocks(page)
    assert len(blocks) >= 2, "the page marks its examples for this test"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{page} block", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "tensor(" in printed
    assert set(namespace["balancer"].named_weights) == {"distill", "task"}
    assert namespace["opt"].weights.sum().item() == pytest.approx(1.0)
