"""Every python example in the README and docs/ runs as written (blocks of one page share a namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/index.md", "docs/api.md", "docs/concepts.md", "docs/prompts.md", "docs/prefix.md", "docs/fed.md",
        "docs/federated.md", "docs/protocols.md", "docs/flower.md", "docs/privacy.md"]


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


def _import_table() -> dict:
    """docs/api.md's table ``import | names`` → {first module named in the import cell: [backticked names]}."""
    rows = {}
    for line in (ROOT / "docs" / "api.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `from (fedpeft[\w.]*) import \.\.\.`.*?\| (.*) \|$", line)
        if m:
            rows[m.group(1)] = re.findall(r"`([\w.]+)`", m.group(2))
    return rows


def test_api_md_says_where_each_name_imports_from():
    import importlib

    import fedpeft

    rows = _import_table()
    assert set(rows) == {"fedpeft", "fedpeft.fed", "fedpeft.protocols", "fedpeft.flower", "fedpeft.init",
                         "fedpeft.adapter_io"}
    assert sorted(rows["fedpeft"]) == sorted(fedpeft.__all__)  # the top level, completely
    for module in ("fedpeft.fed", "fedpeft.protocols", "fedpeft.init"):
        mod = importlib.import_module(module)
        for name in rows[module]:
            assert hasattr(mod, name), f"docs/api.md: {module} has no {name}"
    for name in rows["fedpeft.protocols"] + rows["fedpeft.init"]:
        assert name not in fedpeft.__all__, f"docs/api.md says {name} is not top-level, but it is"
    from fedpeft.adapter_io import adapter_state_dict  # noqa: F401  (the last row)
    from fedpeft.losses import MIN_TEMPERATURE  # noqa: F401


def test_import_fedpeft_does_not_import_flower():
    import subprocess
    import sys

    code = "import sys, fedpeft; print(sorted(m for m in sys.modules if m.startswith(('flwr', 'fedpeft.flower'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
