"""The Python examples in the docs run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [
    "docs/quickstart.md", "docs/index.md", "docs/towers.md", "docs/knowledge.md", "docs/gennet.md", "docs/autotune.md",
    "docs/finding-a-pattern.md", "docs/convolutions.md", "docs/attention-and-embeddings.md", "README.md",
    "docs/coming-from-tfmot.md",
]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    blocks = re.findall(r"```python\n(.+?)```", (ROOT / page).read_text(), flags=re.S)
    assert blocks, page
    namespace = {}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102 - our own docs


def test_no_code_span_in_a_table_holds_an_escaped_pipe():
    # In a table, Python-Markdown keeps the backslash of `\|` inside a code
    # span: the page would show a literal \|. Escape the pipe outside the span.
    for page in sorted((ROOT / "docs").glob("*.md")):
        for line in page.read_text().splitlines():
            if line.startswith("|"):
                assert not [s for s in re.findall(r"`[^`]*`", line) if "\\|" in s], (page.name, line)
