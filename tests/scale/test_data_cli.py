"""``vmt data build`` (registered on a parser the way vmt.cli registers its commands)."""

import argparse

import pytest

from vmt.data.cli import add_data_commands
from vmt.data.corpus import CharTokenizer, tokenize
from vmt.data.memmap import MemmapCorpus


def parser():
    p = argparse.ArgumentParser(prog="vmt")
    add_data_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_data_build_writes_a_corpus_and_resumes_as_a_no_op(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("first document\nstill first\n\nsecond one\n")
    argv = ["data", "build", "--text", str(text), "--tokenizer", "char", "--out",
            str(tmp_path / "c"), "--quiet"]
    args = parser().parse_args(argv)
    assert args.func(args) == 0
    assert "2 documents" in capsys.readouterr().out
    corpus = MemmapCorpus(tmp_path / "c")
    ref = tokenize(["first document\nstill first", "second one"], CharTokenizer())
    assert corpus.fingerprint == ref.fingerprint
    args = parser().parse_args(argv)  # a second run finds the finished build
    assert args.func(args) == 0


def test_data_build_needs_text_and_out():
    with pytest.raises(SystemExit):
        parser().parse_args(["data", "build", "--tokenizer", "char"])
