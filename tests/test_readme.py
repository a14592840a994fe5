"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    loss_pre, loss_post, grad_norm = map(float, capsys.readouterr().out.split())
    assert loss_post > loss_pre and grad_norm > 0


def _tables(text: str) -> list[str]:
    """Markdown tables (runs of lines starting with '|'), each as one string."""
    return [m.strip() for m in re.findall(r"(?:^\|.*\n?)+", text, re.M)]


def test_study_tables_are_the_committed_summarys():
    """The evidence tables in the README are copied from docs/study/<name>/summary.md (which `logitsam report`
    rebuilds from the committed runs): after new runs land, copy the tables again, or this fails."""
    text = README.read_text()
    blocks = re.findall(r"<!-- study-tables: (\S+) -->\n(.*?)<!-- /study-tables -->", text, re.S)
    assert blocks, "README has no study-tables block"
    for folder, block in blocks:
        summary = (README.parent / folder / "summary.md").read_text()
        tables = _tables(block)
        assert tables, folder
        for table in tables:
            assert table in _tables(summary), f"README table from {folder} differs from its summary.md:\n{table}"
