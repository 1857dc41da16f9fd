"""The README's Python example runs as written, using only the top-level API."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def _example() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)


def test_readme_python_example_uses_only_the_top_level_api():
    import vmt

    block = _example()
    imports = [line for line in block.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert imports == ["import torch", "import vmt"]
    used = set(re.findall(r"\bvmt\.(\w+)", block))
    assert used and used <= set(vmt.__all__), used - set(vmt.__all__)


@pytest.mark.integration
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    block = _example()
    assert len(block.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "neg_elbo_per_token" in out and (tmp_path / "runs" / "toy" / "checkpoint.json").is_file()
    assert "tensor(" in out  # the written continuation
