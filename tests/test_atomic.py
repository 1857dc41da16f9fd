"""The one atomic-write helper: the target is replaced whole or left as it was."""

import pytest

from vmt.atomic import atomic_path, atomic_write, atomic_write_bytes


def test_a_clean_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with atomic_write(target, "w", fsync=True) as fh:
        fh.write("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text() == "new"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


@pytest.mark.parametrize("writer", ["handle", "path"])
def test_an_error_leaves_the_target_untouched_and_no_temporary(tmp_path, writer):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        if writer == "handle":
            with atomic_write(target) as fh:
                fh.write(b"half")
                raise RuntimeError("disk full")
        else:
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"half")
                raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode must be"), atomic_write(tmp_path / "x", "a"):
        pass
