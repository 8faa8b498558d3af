"""safefs against temp dirs with planted symlinks, hardlinks and races (invariant 2).

The "outside" tree stands for root-owned territory (/etc and friends).  Every attack test takes a
snapshot of it after planting and proves it is byte-for-byte, owner-for-owner unchanged after the
helper's operation, and that the operation failed with a clear UnsafePath.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from capsuled import safefs
from capsuled.safefs import CapsuleHome, EntryKind, UnsafePath

UNIT_DIR = (".config", "systemd", "user")
NOBODY = 65534
DYNAMIC = 61234

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other uids needs root")


@dataclass
class Bed:
    root: Path  # stands for /var/lib/private/capsules
    home: Path
    outside: Path  # stands for root-owned territory

    def open(self) -> CapsuleHome:
        return CapsuleHome.open("cap", str(self.root))


def snapshot(top: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """lstat + content hash of every entry below ``top``, never following links."""
    result: dict[str, tuple[int, int, int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [*dirnames, *filenames, "."]:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(path)
            result[str(path.relative_to(top))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                st.st_mtime_ns,
                digest,
            )
    return result


def chown_tree(top: Path, uid: int) -> None:
    os.chown(top, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            os.chown(Path(dirpath, name), uid, uid, follow_symlinks=False)


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    root = tmp_path / "private" / "capsules"
    home = root / "cap"
    home.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(home, NOBODY, NOBODY)
    outside = tmp_path / "outside"
    (outside / "systemd" / "user").mkdir(parents=True)
    (outside / "secret").write_bytes(b"root secret\n")
    (outside / "systemd" / "user" / "foo.service").write_bytes(b"[Service]\nExecStart=/x\n")
    os.chmod(outside / "secret", 0o600)
    return Bed(root, home, outside)


def unit_path(bed: Bed) -> Path:
    return bed.home.joinpath(*UNIT_DIR)


# --- the happy path and ownership -----------------------------------------------------------


@needs_root
@pytest.mark.parametrize("uid", [NOBODY, DYNAMIC])
def test_new_files_and_dirs_get_the_home_owner(bed: Bed, uid: int) -> None:
    os.chown(bed.home, uid, uid)
    with bed.open() as home:
        assert home.owner == safefs.Owner(uid, uid)
        home.write_file_atomically(UNIT_DIR, "foo.service", b"[Service]\nExecStart=/bin/true\n")
    target = unit_path(bed) / "foo.service"
    assert target.read_bytes() == b"[Service]\nExecStart=/bin/true\n"
    st = target.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, uid, 0o644)
    for depth in range(1, len(UNIT_DIR) + 1):
        dst = bed.home.joinpath(*UNIT_DIR[:depth]).lstat()
        assert stat.S_ISDIR(dst.st_mode)
        assert (dst.st_uid, dst.st_gid, stat.S_IMODE(dst.st_mode)) == (uid, uid, 0o755)


@needs_root
def test_existing_dirs_are_used_and_not_rechowned(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    chown_tree(bed.home, NOBODY)
    os.chmod(bed.home / ".config", 0o700)
    with bed.open() as home:
        home.write_file_atomically(UNIT_DIR, "a.service", b"x")
    assert stat.S_IMODE((bed.home / ".config").stat().st_mode) == 0o700


@needs_root
def test_replace_is_atomic_rename_not_rewrite(bed: Bed) -> None:
    with bed.open() as home:
        home.write_file_atomically(UNIT_DIR, "a.service", b"old")
        before = (unit_path(bed) / "a.service").stat().st_ino
        home.write_file_atomically(UNIT_DIR, "a.service", b"new")
    after = unit_path(bed) / "a.service"
    assert after.read_bytes() == b"new"
    assert after.stat().st_ino != before  # a new inode renamed over the entry
    assert [p.name for p in unit_path(bed).iterdir()] == ["a.service"]  # no temp left


@needs_root
def test_mode_is_masked(bed: Bed) -> None:
    with bed.open() as home:
        home.write_file_atomically(UNIT_DIR, "a.service", b"x", mode=0o6777)
    assert stat.S_IMODE((unit_path(bed) / "a.service").stat().st_mode) == 0o755


# --- opening the home -------------------------------------------------------------------------


def test_missing_home_is_nohome(bed: Bed) -> None:
    with pytest.raises(safefs.NoHome):
        CapsuleHome.open("other", str(bed.root))


def test_invalid_capsule_name_is_a_caller_bug(bed: Bed) -> None:
    with pytest.raises(ValueError, match="invalid capsule name"):
        CapsuleHome.open("../cap", str(bed.root))


@needs_root
@pytest.mark.parametrize("uid", [0, 1, 999, 1000, 60000, 65533, 65535])
def test_home_with_unexpected_owner_is_refused(bed: Bed, uid: int) -> None:
    os.chown(bed.home, uid, uid)
    with pytest.raises(UnsafePath, match="owned by"):
        bed.open()


@needs_root
def test_root_owned_home_only_when_allowed(bed: Bed) -> None:
    os.chown(bed.home, 0, 0)
    with CapsuleHome.open("cap", str(bed.root), allow_root_owned=True) as home:
        assert home.owner == safefs.Owner(0, 0)


@needs_root
def test_home_that_is_a_symlink_is_refused(bed: Bed) -> None:
    real = bed.root / "real"
    bed.home.rename(real)
    bed.home.symlink_to(real)
    with pytest.raises(UnsafePath, match="symlink"):
        bed.open()


@needs_root
def test_symlink_on_the_way_to_the_home_is_refused(bed: Bed, tmp_path: Path) -> None:
    # Like /var/lib/capsules -> private/capsules: the walk must not follow it.
    link = tmp_path / "capsules-link"
    link.symlink_to(bed.root)
    with pytest.raises(UnsafePath, match="symlink"):
        CapsuleHome.open("cap", str(link))


def test_closed_home_refuses_use(bed: Bed) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    home = bed.open()
    home.close()
    home.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        home.list_dir(())


# --- planted symlinks and hardlinks -------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_symlinked_directory_on_the_way_is_refused(bed: Bed, depth: int) -> None:
    """A symlink at .config, .config/systemd or .config/systemd/user pointing outside."""
    planted = bed.home.joinpath(*UNIT_DIR[:depth])
    planted.parent.mkdir(parents=True, exist_ok=True)
    # Point at an outside dir shaped like the rest of the path, so following would "work".
    target = {1: bed.outside, 2: bed.outside / "systemd", 3: bed.outside / "systemd" / "user"}
    planted.symlink_to(target[depth])
    chown_tree(bed.home, NOBODY)
    before = snapshot(bed.outside)
    with bed.open() as home:
        with pytest.raises(UnsafePath) as info:
            home.write_file_atomically(UNIT_DIR, "foo.service", b"evil")
        assert info.value.path.endswith("/" + "/".join(UNIT_DIR[:depth]))
        assert "symlink" in info.value.reason
        with pytest.raises(UnsafePath):
            home.remove_file(UNIT_DIR, "foo.service")
        with pytest.raises(UnsafePath):
            home.read_file(UNIT_DIR, "foo.service", 1000)
        with pytest.raises(UnsafePath):
            home.list_dir(UNIT_DIR)
        with pytest.raises(UnsafePath):
            home.symlink(UNIT_DIR, "x.service", "/dev/null")
    assert snapshot(bed.outside) == before
    assert planted.is_symlink()


@needs_root
def test_symlink_at_the_file_itself_is_refused_and_not_followed(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    (unit_path(bed) / "foo.service").symlink_to(bed.outside / "secret")
    chown_tree(bed.home, NOBODY)
    before = snapshot(bed.outside)
    with bed.open() as home:
        with pytest.raises(UnsafePath, match="symlink"):
            home.write_file_atomically(UNIT_DIR, "foo.service", b"evil")
        with pytest.raises(UnsafePath, match="symlink"):
            home.read_file(UNIT_DIR, "foo.service", 1000)
    assert snapshot(bed.outside) == before
    assert (unit_path(bed) / "foo.service").is_symlink()
    assert [p.name for p in unit_path(bed).iterdir()] == ["foo.service"]  # no temp left


@needs_root
def test_hardlink_at_the_file_itself_is_refused(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    os.link(bed.outside / "secret", unit_path(bed) / "foo.service")
    chown_tree(bed.home, NOBODY)
    os.chown(bed.outside / "secret", 0, 0)  # the shared inode stays "root's"
    before = snapshot(bed.outside)
    with bed.open() as home, pytest.raises(UnsafePath, match="hardlinked"):
        home.write_file_atomically(UNIT_DIR, "foo.service", b"evil")
    assert snapshot(bed.outside) == before
    assert (bed.outside / "secret").read_bytes() == b"root secret\n"


@needs_root
def test_removing_planted_links_removes_only_the_entries(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    os.link(bed.outside / "secret", unit_path(bed) / "hard.service")
    (unit_path(bed) / "soft.service").symlink_to(bed.outside / "secret")
    (unit_path(bed) / "dirlink.service").symlink_to(bed.outside / "systemd")
    chown_tree(bed.home, NOBODY)
    os.chown(bed.outside / "secret", 0, 0)
    content_before = {
        k: (v[0], v[1], v[2], v[5]) for k, v in snapshot(bed.outside).items()
    }  # nlink and the inode's times change when a link goes, nothing else may
    with bed.open() as home:
        assert home.remove_file(UNIT_DIR, "hard.service")
        assert home.remove_file(UNIT_DIR, "soft.service")
        assert home.remove_file(UNIT_DIR, "dirlink.service")
        assert not home.remove_file(UNIT_DIR, "soft.service")
    after = {k: (v[0], v[1], v[2], v[5]) for k, v in snapshot(bed.outside).items()}
    assert after == content_before
    assert list(unit_path(bed).iterdir()) == []


@needs_root
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_non_directory_on_the_way_is_refused(bed: Bed, depth: int) -> None:
    planted = bed.home.joinpath(*UNIT_DIR[:depth])
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"not a dir")
    chown_tree(bed.home, NOBODY)
    with bed.open() as home, pytest.raises(UnsafePath, match="not a directory"):
        home.write_file_atomically(UNIT_DIR, "foo.service", b"x")
    assert planted.read_bytes() == b"not a dir"


@needs_root
def test_directory_or_fifo_at_the_target_is_refused(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    (unit_path(bed) / "d.service").mkdir()
    os.mkfifo(unit_path(bed) / "f.service")
    chown_tree(bed.home, NOBODY)
    with bed.open() as home:
        with pytest.raises(UnsafePath, match="directory"):
            home.write_file_atomically(UNIT_DIR, "d.service", b"x")
        with pytest.raises(UnsafePath, match="other"):
            home.write_file_atomically(UNIT_DIR, "f.service", b"x")
        with pytest.raises(UnsafePath, match="not a regular file"):
            home.read_file(UNIT_DIR, "f.service", 100)  # O_NONBLOCK: no hang on the FIFO
        with pytest.raises(UnsafePath, match="directory"):
            home.remove_file(UNIT_DIR, "d.service")
    assert sorted(p.name for p in unit_path(bed).iterdir()) == ["d.service", "f.service"]


@needs_root
@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "x\0y"])
def test_bad_components_are_refused(bed: Bed, bad: str) -> None:
    with bed.open() as home:
        with pytest.raises(UnsafePath, match="single file name"):
            home.write_file_atomically((".config", bad), "a.service", b"x")
        with pytest.raises(UnsafePath, match="single file name"):
            home.write_file_atomically(UNIT_DIR, bad, b"x")
        with pytest.raises(UnsafePath, match="single file name"):
            home.remove_file(UNIT_DIR, bad)


# --- races: what openat semantics buy ----------------------------------------------------------


@needs_root
def test_directory_swapped_after_open_does_not_redirect_writes(bed: Bed) -> None:
    """Once a directory fd is held, swapping the path for a symlink cannot redirect us."""
    with bed.open() as home:
        dir_fd = home.open_dir(UNIT_DIR, create=True)
        try:
            moved = bed.home / "moved"
            (bed.home / ".config").rename(moved)
            (bed.home / ".config").symlink_to(bed.outside)
            before = snapshot(bed.outside)
            safefs.write_atomically_at(dir_fd, "foo.service", b"safe", home.owner)
        finally:
            os.close(dir_fd)
    assert snapshot(bed.outside) == before
    assert (moved / "systemd" / "user" / "foo.service").read_bytes() == b"safe"


@needs_root
def test_directory_swapped_for_symlink_right_after_mkdir_is_refused(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_make = safefs._make_dir_at

    def make_then_swap(parent_fd: int, name: str) -> None:
        real_make(parent_fd, name)
        if name == "systemd":  # the capsule wins the race on the second component
            os.rename(name, "stolen", src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            os.symlink(str(bed.outside / "systemd"), name, dir_fd=parent_fd)

    monkeypatch.setattr(safefs, "_make_dir_at", make_then_swap)
    before = snapshot(bed.outside)
    with bed.open() as home, pytest.raises(UnsafePath, match="symlink"):
        home.write_file_atomically(UNIT_DIR, "foo.service", b"evil")
    assert snapshot(bed.outside) == before


@needs_root
def test_temp_name_planted_in_advance_is_never_reused(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capsule guessing our temp name (here: forced) gets EEXIST, never a write through."""
    unit_path(bed).mkdir(parents=True)
    names = iter(["guess", "guess", "fresh"])
    monkeypatch.setattr(safefs, "_temp_name", lambda final: next(names))
    os.link(bed.outside / "secret", unit_path(bed) / "guess")
    chown_tree(bed.home, NOBODY)
    os.chown(bed.outside / "secret", 0, 0)
    before = snapshot(bed.outside)
    with bed.open() as home:
        home.write_file_atomically(UNIT_DIR, "foo.service", b"ok")
    assert snapshot(bed.outside) == before
    assert (unit_path(bed) / "foo.service").read_bytes() == b"ok"


# --- reading, listing, symlinks --------------------------------------------------------------


@needs_root
def test_read_file_caps_size(bed: Bed) -> None:
    with bed.open() as home:
        home.write_file_atomically(UNIT_DIR, "a.service", b"x" * 100)
        assert home.read_file(UNIT_DIR, "a.service", 100) == b"x" * 100
        with pytest.raises(safefs.FileTooLarge):
            home.read_file(UNIT_DIR, "a.service", 99)
        with pytest.raises(safefs.NotFound):
            home.read_file(UNIT_DIR, "missing.service", 99)
        with pytest.raises(safefs.NotFound):
            home.read_file(("nowhere",), "a.service", 99)


@needs_root
def test_list_dir_reports_kinds_without_following(bed: Bed) -> None:
    with bed.open() as home:
        assert home.list_dir(UNIT_DIR) == []  # missing dir: no units
        home.write_file_atomically(UNIT_DIR, "a.service", b"x")
        home.symlink(UNIT_DIR, "b.service", "/dev/null")
        os.close(home.open_dir((*UNIT_DIR, "c.target.wants"), create=True))
        listing = home.list_dir(UNIT_DIR)
    assert listing == [
        ("a.service", EntryKind.FILE),
        ("b.service", EntryKind.SYMLINK),
        ("c.target.wants", EntryKind.DIRECTORY),
    ]


@needs_root
def test_list_dir_refuses_more_than_max_entries(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    for i in range(5):
        (unit_path(bed) / f"u{i}.service").write_bytes(b"x")
    chown_tree(bed.home, NOBODY)
    with bed.open() as home:
        assert len(home.list_dir(UNIT_DIR, max_entries=5)) == 5
        with pytest.raises(safefs.TooManyEntries) as info:
            home.list_dir(UNIT_DIR, max_entries=4)
    assert info.value.max_entries == 4
    assert isinstance(info.value, safefs.SafeFsError)
    assert info.value.path.endswith(".config/systemd/user")


@needs_root
def test_list_dir_default_bound(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    for i in range(safefs.MAX_LIST_ENTRIES + 1):
        (unit_path(bed) / f"u{i}.service").touch()
    chown_tree(bed.home, NOBODY)
    with bed.open() as home, pytest.raises(safefs.TooManyEntries):
        home.list_dir(UNIT_DIR)


class _Junk:
    """A DirEntry stand-in for a directory that never ends."""

    def __init__(self, i: int) -> None:
        self.name = f"junk{i}"

    def is_symlink(self) -> bool:
        return False

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return True

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return False


@needs_root
def test_list_dir_stops_reading_past_the_bound(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only max_entries + 1 entries are read, however many the directory holds."""
    unit_path(bed).mkdir(parents=True)
    chown_tree(bed.home, NOBODY)
    read = 0

    class Endless:
        def __enter__(self) -> Iterator[_Junk]:
            return self.entries()

        def __exit__(self, *exc: object) -> None:
            return None

        @staticmethod
        def entries() -> Iterator[_Junk]:
            nonlocal read
            while True:
                read += 1
                yield _Junk(read)

    monkeypatch.setattr(os, "scandir", lambda fd: Endless())
    with bed.open() as home, pytest.raises(safefs.TooManyEntries):
        home.list_dir(UNIT_DIR, max_entries=100)
    assert read == 101


@needs_root
def test_entry_kind(bed: Bed) -> None:
    unit_path(bed).mkdir(parents=True)
    (unit_path(bed) / "l.service").symlink_to(bed.outside / "secret")
    (unit_path(bed) / "f.service").write_bytes(b"x")
    chown_tree(bed.home, NOBODY)
    with bed.open() as home:
        assert home.entry_kind(UNIT_DIR, "l.service") is EntryKind.SYMLINK
        assert home.entry_kind(UNIT_DIR, "f.service") is EntryKind.FILE
        assert home.entry_kind(UNIT_DIR[:2], "user") is EntryKind.DIRECTORY
        assert home.entry_kind(UNIT_DIR, "missing.service") is None
        assert home.entry_kind(("nowhere",), "x") is None


@needs_root
def test_symlink_is_atomic_owned_and_replaceable(bed: Bed) -> None:
    wants = (*UNIT_DIR, "capsule@.target.wants")
    with bed.open() as home:
        home.symlink(wants, "a.service", "../a.service")
        link = bed.home.joinpath(*wants, "a.service")
        st = link.lstat()
        assert stat.S_ISLNK(st.st_mode)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        assert home.read_link(wants, "a.service") == "../a.service"
        home.symlink(wants, "a.service", "/elsewhere/a.service")
        assert os.readlink(link) == "/elsewhere/a.service"
        wants_st = bed.home.joinpath(*wants).lstat()
        assert (wants_st.st_uid, stat.S_IMODE(wants_st.st_mode)) == (NOBODY, 0o755)
        home.write_file_atomically(UNIT_DIR, "f.service", b"x")
        with pytest.raises(UnsafePath, match="not a symlink"):
            home.symlink(UNIT_DIR, "f.service", "/dev/null")
        with pytest.raises(UnsafePath, match="not a symlink"):
            home.read_link(UNIT_DIR, "f.service")
    assert sorted(os.listdir(bed.home.joinpath(*wants))) == ["a.service"]


@needs_root
def test_symlink_pointing_outside_is_never_followed_by_chown(bed: Bed) -> None:
    before = snapshot(bed.outside)
    with bed.open() as home:
        home.symlink(UNIT_DIR, "x.service", str(bed.outside / "secret"))
    assert snapshot(bed.outside) == before


@needs_root
@pytest.mark.parametrize("planted", ["hardlink", "file"])
def test_temp_symlink_swapped_before_chown_is_refused(
    bed: Bed, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """The capsule sees our temporary name appear (inotify) and swaps in, before we chown it,
    a hardlink to a root-owned file (possible where fs.protected_hardlinks=0) or a file."""
    create = CapsuleHome._create_temp_symlink

    def create_then_swap(dir_fd: int, final: str, target: str, display: str) -> str:
        temp = create(dir_fd, final, target, display)
        os.unlink(temp, dir_fd=dir_fd)
        if planted == "hardlink":
            os.link(bed.outside / "secret", temp, dst_dir_fd=dir_fd)
        else:
            os.close(os.open(temp, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dir_fd))
        return temp

    monkeypatch.setattr(CapsuleHome, "_create_temp_symlink", staticmethod(create_then_swap))
    with bed.open() as home, pytest.raises(UnsafePath, match="replaced"):
        home.symlink(UNIT_DIR, "x.service", "/dev/null")
    secret = (bed.outside / "secret").lstat()
    assert (secret.st_uid, secret.st_gid, secret.st_nlink) == (0, 0, 1)  # not chowned, temp gone
    assert os.listdir(unit_path(bed)) == []


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_works_without_cap_fowner(bed: Bed) -> None:
    """chmod happens before chown, so CAP_CHOWN + CAP_DAC_OVERRIDE suffice (no CAP_FOWNER)."""
    helper_dir = Path(safefs.__file__).resolve().parent.parent
    code = (
        "import sys\n"
        "from capsuled.safefs import CapsuleHome\n"
        "with CapsuleHome.open('cap', sys.argv[1]) as h:\n"
        "    h.write_file_atomically(('.config', 'systemd', 'user'), 'a.service', b'x')\n"
        "    h.symlink(('.config', 'systemd', 'user', 'w.wants'), 'a.service', '../a.service')\n"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-fowner",
            "--inh-caps",
            "-fowner",
            sys.executable,
            "-c",
            code,
            str(bed.root),
        ],
        env={**os.environ, "PYTHONPATH": str(helper_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    st = (unit_path(bed) / "a.service").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o644)
