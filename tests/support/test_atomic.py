"""qlora_lab.support.atomic: a directory appears whole or not at all."""

import pytest

from qlora_lab.support.atomic import atomic_directory


def test_a_new_directory_appears_complete(tmp_path):
    target = tmp_path / "sub" / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        (staging / "inner").mkdir()
        (staging / "inner" / "b.txt").write_text("b")
        assert not target.exists()
        assert staging.parent == target.parent and staging.name.startswith(".out.")
    assert (target / "a.txt").read_text() == "a" and (target / "inner" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_an_existing_directory_is_replaced_only_when_told(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
        with atomic_directory(target):
            raise AssertionError("must not be reached")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_the_old_directory_and_no_leftovers(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "half.txt").write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "old.txt").read_text() == "old"


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        with atomic_directory(tmp_path / "out", overwrite=True):
            pass


def test_a_directory_that_appears_meanwhile_is_left_alone(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while"):
        with atomic_directory(target) as staging:
            (staging / "mine.txt").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_directory_counts_as_free(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
