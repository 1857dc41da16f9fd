import hashlib
import logging

import numpy as np
import pytest
import torch

from vmt.data.corpus import (
    CharTokenizer,
    TokenizedCorpus,
    default_corpus,
    pydoc_texts,
    pydoc_topics,
    read_text_files,
    tokenize,
)


def _corpus(lengths, vocab=11, name="c", tokenizer_name="tok", seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = tuple(torch.randint(0, vocab, (n,), generator=g) for n in lengths)
    return TokenizedCorpus(name, docs, vocab, tokenizer_name)


def test_pydoc_texts_are_the_topics_in_sorted_order():
    from pydoc_data.topics import topics

    texts = pydoc_texts()
    assert texts == [topics[k] for k in sorted(topics)]
    assert [k for k, _ in pydoc_topics()] == sorted(topics)
    assert len(texts) == len(topics) >= 50
    assert all(len(t) > 0 for t in texts)


def test_read_text_files_reads_each_file_as_one_document(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first document\nline two", encoding="utf-8")
    b.write_text("zweites Dokument: äöü", encoding="utf-8")
    assert read_text_files([b, str(a)]) == ["zweites Dokument: äöü", "first document\nline two"]
    with pytest.raises(FileNotFoundError, match="no text file"):
        read_text_files([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="no paths"):
        read_text_files([])


def test_char_tokenizer_round_trip_and_unknown():
    tok = CharTokenizer("abc ")
    assert tok.vocab_size == len(tok) == 5
    assert tok.encode("ab cx") == [1, 2, 4, 3, 0]
    assert tok.decode([1, 2, 4, 3]) == "ab c"
    assert tok.decode(torch.tensor([0, 1])) == "\ufffda"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([5])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("aa")
    fitted = CharTokenizer.from_texts(["hello", "world"])
    assert fitted.alphabet == "dehlorw"
    assert fitted.decode(fitted.encode("hello world")) == "hello\ufffdworld"
    # The name identifies the alphabet, so two tokenizers with different alphabets differ.
    assert CharTokenizer("ab").name_or_path != CharTokenizer("ba").name_or_path


def test_tokenize_drops_short_documents_with_a_warning(caplog):
    tok = CharTokenizer("abcdef")
    with caplog.at_level(logging.WARNING, logger="vmt.data.corpus"):
        corpus = tokenize(["abc", "", "d", "fe"], tok, name="toy")
    assert "dropped 2 of 4" in caplog.text
    assert [d.tolist() for d in corpus.documents] == [[1, 2, 3], [6, 5]]
    assert corpus.vocab_size == 7 and corpus.tokenizer_name == tok.name_or_path
    assert corpus.num_tokens == 5 and corpus.lengths == [3, 2] and len(corpus) == 2


@pytest.mark.parametrize("texts", [[""], ["a"], ["", "b", ""]])
def test_tokenize_without_usable_document_is_a_clear_error(texts):
    with pytest.raises(ValueError, match="none of the .* texts has 2 or more tokens"):
        tokenize(texts, CharTokenizer("ab"), name="tiny")


def test_tokenize_rejects_a_bare_string():
    with pytest.raises(ValueError, match="single str"):
        tokenize("abc", CharTokenizer("abc"))


def test_fingerprint_matches_an_independent_hash_and_tracks_content():
    corpus = _corpus([4, 3])
    # Independent reimplementation of the documented scheme (little-endian int64 ids).
    h = hashlib.sha256(b"tokenizer=tok\nvocab=11\ndocuments=2\n")
    for d in corpus.documents:
        h.update(f"{len(d)}:".encode() + np.asarray(d.tolist(), dtype="<i8").tobytes())
    assert corpus.fingerprint == h.hexdigest()

    same = TokenizedCorpus("other name", tuple(d.clone() for d in corpus.documents), 11, "tok")
    assert same.fingerprint == corpus.fingerprint  # the label is not part of the content
    changed = list(corpus.documents)
    changed[1] = changed[1].clone()
    changed[1][0] = (changed[1][0] + 1) % 11
    assert TokenizedCorpus("c", tuple(changed), 11, "tok").fingerprint != corpus.fingerprint
    joined = torch.cat(corpus.documents)
    resplit = (joined[:3], joined[3:])  # same ids, other document boundary
    assert TokenizedCorpus("c", resplit, 11, "tok").fingerprint != corpus.fingerprint
    assert TokenizedCorpus("c", corpus.documents, 12, "tok").fingerprint != corpus.fingerprint
    assert TokenizedCorpus("c", corpus.documents, 11, "tok2").fingerprint != corpus.fingerprint


def test_corpus_validates_its_documents():
    with pytest.raises(ValueError, match="int64"):
        TokenizedCorpus("c", (torch.zeros(3, dtype=torch.int32),), 5, "t")
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        TokenizedCorpus("c", (torch.tensor([1, 5]),), 5, "t")
    with pytest.raises(ValueError, match="no documents"):
        TokenizedCorpus("c", (), 5, "t")
    with pytest.raises(ValueError, match="empty"):
        TokenizedCorpus("c", (torch.zeros(0, dtype=torch.int64),), 5, "t")


def test_split_is_a_deterministic_partition_by_document():
    corpus = _corpus(range(2, 22))  # 20 documents of distinct lengths identify each one
    train, valid, test = corpus.split(0.2, 0.1, seed=3)
    assert (len(train), len(valid), len(test)) == (14, 4, 2)
    parts = [sorted(p.lengths) for p in (train, valid, test)]
    assert sorted(sum(parts, [])) == list(range(2, 22))
    for p in (train, valid, test):
        assert p.lengths == sorted(p.lengths)  # original order kept inside a split
        assert p.vocab_size == corpus.vocab_size and p.tokenizer_name == corpus.tokenizer_name
    again = corpus.split(0.2, 0.1, seed=3)
    assert [p.fingerprint for p in again] == [p.fingerprint for p in (train, valid, test)]
    other = corpus.split(0.2, 0.1, seed=4)
    assert [p.fingerprint for p in other] != [p.fingerprint for p in (train, valid, test)]


def test_split_keeps_every_part_non_empty_or_refuses():
    train, valid, test = _corpus([3, 4, 5]).split(0.01, 0.01, seed=0)
    assert (len(train), len(valid), len(test)) == (1, 1, 1)
    with pytest.raises(ValueError, match="cannot split 2 documents"):
        _corpus([3, 4]).split(0.1, 0.1)
    with pytest.raises(ValueError, match="valid_fraction"):
        _corpus([3, 4, 5]).split(0.0, 0.1)


def test_truncate_keeps_whole_documents_and_clips_the_last():
    corpus = _corpus([5, 4, 6])
    cut = corpus.truncate(7)
    assert cut.lengths == [5, 2]
    assert torch.equal(cut.documents[0], corpus.documents[0])
    assert torch.equal(cut.documents[1], corpus.documents[1][:2])
    assert corpus.truncate(9).lengths == [5, 4]
    assert corpus.truncate(100).lengths == [5, 4, 6]
    with pytest.raises(ValueError, match="max_tokens"):
        corpus.truncate(0)


def test_default_corpus_with_a_character_tokenizer_keeps_every_character():
    texts = pydoc_texts()
    tok = CharTokenizer.from_texts(texts)
    corpus = default_corpus(tok)
    assert corpus.name == "pydoc"
    assert len(corpus) == len(texts)
    assert corpus.num_tokens == sum(len(t) for t in texts)
    assert tok.decode(corpus.documents[3]) == texts[3]
