"""Every python example in the README and docs/ runs as written (blocks of one page share a namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/index.md", "docs/concepts.md", "docs/prompts.md", "docs/prefix.md", "docs/fed.md", "docs/federated.md",
        "docs/protocols.md"]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    blocks = _blocks(ROOT / doc)
    assert blocks, f"{doc} has no python example"
    monkeypatch.chdir(tmp_path)  # examples may write adapter files
    namespace: dict = {"__name__": f"docs_{Path(doc).stem}"}
    for code in blocks:
        exec(compile(code, f"{doc}:example", "exec"), namespace)


def test_federated_md_shows_the_whole_pfedpg_round():
    code = "\n".join(_blocks(ROOT / "docs" / "federated.md"))
    for needed in ("PromptGenerator(", "set_prompts(", "get_prompts(", "fed.delta_backward(", ".step()"):
        assert needed in code, f"docs/federated.md lost its {needed} example"
