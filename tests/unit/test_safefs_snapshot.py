"""safefs snapshots (Deploy's "put it back"): what is recorded, what is refused, what restoring
gives back, and that nothing outside the home is touched on the way (invariant 2)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_safefs import Bed, bed, needs_root, snapshot

from capsuled.safefs import EntryKind, FileTooLarge, UnsafePath

__all__ = ["bed"]  # the fixture, re-exported for pytest

DIR = ("app", "conf")


def test_a_file_is_recorded_with_its_bytes_and_mode_and_comes_back(bed: Bed) -> None:
    target = bed.home / "app" / "conf" / "x.toml"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old\n")
    os.chmod(target, 0o640)
    with bed.open() as home:
        snap = home.snapshot_entry(DIR, "x.toml", 1024)
        assert (snap.kind, snap.data, snap.mode) == (EntryKind.FILE, b"old\n", 0o640)
        home.write_file_atomically(DIR, "x.toml", b"new\n")
        home.restore_entry(snap)
    assert target.read_bytes() == b"old\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_nothing_there_is_recorded_and_restoring_removes_what_was_made(bed: Bed) -> None:
    with bed.open() as home:
        snap = home.snapshot_entry(("a", "b", "c"), "f", 1024)
        assert snap.kind is None
        assert snap.missing_dirs_from == 1  # "a" did not exist
        home.write_file_atomically(("a", "b", "c"), "f", b"x")
        home.restore_entry(snap)
    assert list(bed.home.iterdir()) == []  # the file and the three directories made for it


def test_a_directory_that_existed_stays(bed: Bed) -> None:
    (bed.home / "a").mkdir()
    with bed.open() as home:
        snap = home.snapshot_entry(("a", "b"), "f", 1024)
        assert snap.missing_dirs_from == 2
        home.write_file_atomically(("a", "b"), "f", b"x")
        home.restore_entry(snap)
    assert [p.name for p in bed.home.iterdir()] == ["a"]
    assert list((bed.home / "a").iterdir()) == []


def test_a_directory_filled_meanwhile_is_not_removed(bed: Bed) -> None:
    with bed.open() as home:
        snap = home.snapshot_entry(("a",), "f", 1024)
        home.write_file_atomically(("a",), "f", b"x")
        (bed.home / "a" / "other").write_bytes(b"the capsule's")
        home.restore_entry(snap)
    assert [p.name for p in (bed.home / "a").iterdir()] == ["other"]


def test_a_symlink_is_recorded_by_its_target_and_comes_back(bed: Bed) -> None:
    (bed.home / "app").mkdir()
    os.symlink("/var/lib/capsules/cap/x", bed.home / "app" / "link")
    with bed.open() as home:
        snap = home.snapshot_entry(("app",), "link", 1024)
        assert (snap.kind, snap.target) == (EntryKind.SYMLINK, "/var/lib/capsules/cap/x")
        home.remove_file(("app",), "link")
        home.restore_entry(snap)
    assert os.readlink(bed.home / "app" / "link") == "/var/lib/capsules/cap/x"


def test_a_symlinked_directory_on_the_way_is_refused_and_outside_is_untouched(bed: Bed) -> None:
    os.symlink(bed.outside, bed.home / "app")
    before = snapshot(bed.outside)
    with bed.open() as home, pytest.raises(UnsafePath, match="symlink"):
        home.snapshot_entry(("app", "systemd"), "x", 1024)
    assert snapshot(bed.outside) == before


@needs_root
def test_a_hardlinked_file_is_refused(bed: Bed) -> None:
    os.link(bed.outside / "secret", bed.home / "secret")
    with bed.open() as home, pytest.raises(UnsafePath, match="hardlinked"):
        home.snapshot_entry((), "secret", 1024)


@pytest.mark.parametrize(("kind", "said"), [("directory", "a directory"), ("fifo", "special")])
def test_a_directory_or_special_file_where_a_file_goes_is_refused(
    bed: Bed, kind: str, said: str
) -> None:
    path = bed.home / "x"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with bed.open() as home, pytest.raises(UnsafePath, match=said):
        home.snapshot_entry((), "x", 1024)


def test_a_file_over_the_cap_is_refused(bed: Bed) -> None:
    (bed.home / "big").write_bytes(bytes(2048))
    with bed.open() as home, pytest.raises(FileTooLarge):
        home.snapshot_entry((), "big", 1024)


def test_remove_empty_dir_never_removes_a_full_one_or_follows_a_link(bed: Bed) -> None:
    (bed.home / "full").mkdir()
    (bed.home / "full" / "f").write_bytes(b"x")
    os.symlink(bed.outside, bed.home / "link")
    (bed.outside / "empty").mkdir()
    with bed.open() as home:
        assert home.remove_empty_dir(("full",)) is False
        assert home.remove_empty_dir(("missing",)) is False
        assert home.remove_empty_dir(("link",)) is False  # rmdir of a symlink: ENOTDIR
        with pytest.raises(UnsafePath):
            home.remove_empty_dir(("link", "empty"))
    assert (bed.outside / "empty").is_dir()
    assert Path(bed.home / "full" / "f").exists()
