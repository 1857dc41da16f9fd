import json

import pytest

from vmt import benchmarks
from vmt.benchmarks.report import BenchResult, markdown_table, update_docs, write_json


def test_every_benchmark_module_is_complete():
    for name, module in benchmarks.available().items():
        assert module.NAME == name
        assert isinstance(module.SUMMARY, str) and module.SUMMARY
        assert callable(module.run)


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(KeyError, match="available"):
        benchmarks.get("no-such-benchmark")


def test_result_rejects_non_numbers():
    with pytest.raises(TypeError, match="speed"):
        BenchResult("x", {"speed": "fast"}, {})


def test_json_and_docs_section_round_trip(tmp_path):
    result = BenchResult("demo-bench", {"speedup_L256": 7.5}, {"quick": True},
                         markdown=markdown_table(["L", "speedup"], [[256, 7.5]]))
    write_json(result, tmp_path / "r.json")
    record = json.loads((tmp_path / "r.json").read_text())
    assert record == {"benchmark": "demo-bench", "metrics": {"speedup_L256": 7.5},
                      "config": {"quick": True}}
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n")
    update_docs(result, docs)
    result.markdown = "replaced"
    update_docs(result, docs)
    text = docs.read_text()
    assert text.count("bench:demo-bench:begin") == 1
    assert "replaced" in text and "7.5" not in text and "intro" in text
