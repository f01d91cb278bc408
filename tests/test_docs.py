"""The Python examples in the docs run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [
    "docs/quickstart.md", "docs/index.md", "docs/towers.md", "docs/knowledge.md", "docs/gennet.md", "docs/autotune.md",
    "docs/finding-a-pattern.md", "docs/convolutions.md", "docs/attention-and-embeddings.md", "README.md",
]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    blocks = re.findall(r"```python\n(.+?)```", (ROOT / page).read_text(), flags=re.S)
    assert blocks, page
    namespace = {}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102 - our own docs
