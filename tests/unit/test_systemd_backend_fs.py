"""The backend's filesystem facts and the capsule socket pinning, against temp directories with
planted symlinks (invariant 2: the capsule controls everything below its own directory)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from jeepney import HeaderFields, Message

from capsuled.systemd import backend, capsule_socket, hostfs

CAPSULE_UID = 61234  # in systemd's dynamic uid range

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to a dynamic uid needs root")


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "private-capsules"
    root.mkdir()
    monkeypatch.setattr(hostfs, "STATE_ROOT", str(root))
    monkeypatch.setattr(hostfs, "LEGACY_STATE_ROOT", str(tmp_path / "capsules"))
    return root


def unit_dir(state_root: Path, name: str) -> Path:
    d = state_root / name / ".config" / "systemd" / "user"
    d.mkdir(parents=True)
    return d


def test_count_unit_files_counts_units_not_templates_or_other_files(state_root: Path) -> None:
    d = unit_dir(state_root, "a")
    for f in ("web.service", "tick.timer", "tmpl@.service", "inst@x.service", "notes.txt"):
        (d / f).touch()
    (d / "web.service.d").mkdir()
    (d / "capsule@.target.wants").mkdir()
    assert hostfs.count_unit_files("a") == 3  # web, tick, inst@x


@pytest.mark.parametrize("component", [".config", ".config/systemd", ".config/systemd/user"])
def test_count_unit_files_never_follows_a_planted_symlink(
    state_root: Path, tmp_path: Path, component: str
) -> None:
    outside = tmp_path / "outside"
    (outside / ".config" / "systemd" / "user").mkdir(parents=True)
    (outside / ".config" / "systemd" / "user" / "root.service").touch()
    home = state_root / "a"
    home.mkdir()
    link = home / component
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / component)
    assert hostfs.count_unit_files("a") == 0


def test_count_unit_files_when_capsule_dir_itself_is_a_symlink(
    state_root: Path, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere"
    (target / ".config" / "systemd" / "user").mkdir(parents=True)
    (target / ".config" / "systemd" / "user" / "x.service").touch()
    (state_root / "a").symlink_to(target)
    assert hostfs.count_unit_files("a") == 0
    assert not hostfs.has_state_dir("a")  # a symlink is no state directory


def test_count_unit_files_is_bounded(state_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = unit_dir(state_root, "a")
    for i in range(30):
        (d / f"u{i}.service").touch()
    monkeypatch.setattr(hostfs, "MAX_SCANNED_ENTRIES", 10)
    assert hostfs.count_unit_files("a") == 10


def test_real_state_dirs_and_has_state_dir(state_root: Path) -> None:
    (state_root / "a").mkdir()
    (state_root / ".hidden").mkdir()
    assert hostfs.real_state_dirs().keys() == {"a"}
    assert hostfs.has_state_dir("a")
    assert not hostfs.has_state_dir("b")


def test_autostart_link_must_be_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfs, "SYSTEM_CONFIG_DIR", str(tmp_path))
    wants = tmp_path / "multi-user.target.wants"
    wants.mkdir()
    (wants / "capsule@a.service").symlink_to("/usr/lib/systemd/system/capsule@.service")
    (wants / "capsule@b.service").touch()  # a plain file is not what AddDependencyUnitFiles makes
    (wants / "other.service").symlink_to("/x")
    assert hostfs.autostart_enabled("a")
    assert not hostfs.autostart_enabled("b")
    assert not hostfs.autostart_enabled("c")
    assert hostfs.autostart_names() == {"a", "b"}  # names only; existence is checked per name


class RecordingBus:
    """Stands in for the system bus connection: records the D-Bus members called."""

    def __init__(self) -> None:
        self.members: list[str] = []

    async def call(self, msg: Message, *, unit: str = "") -> tuple[object, ...]:
        self.members.append(str(msg.header.fields[HeaderFields.member]))
        return ([("unlink", f"/etc/.../{unit}", "")],)


def test_removing_autostart_goes_through_pid1_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /etc is read-only under capsuled.service (ProtectSystem=strict): the link is PID 1's to
    # remove (DisableUnitFiles, verified on 257), and we never unlink it ourselves, even when
    # it is still there after the call.
    monkeypatch.setattr(hostfs, "SYSTEM_CONFIG_DIR", str(tmp_path))
    wants = tmp_path / "multi-user.target.wants"
    wants.mkdir()
    link = wants / "capsule@a.service"
    link.symlink_to("/usr/lib/systemd/system/capsule@.service")
    bus = RecordingBus()
    sd = backend.DBusSystemdBackend()
    monkeypatch.setattr(sd, "_bus", lambda: asyncio.sleep(0, bus))
    asyncio.run(sd.set_autostart("a", False))
    assert bus.members == ["DisableUnitFilesWithFlags", "Reload"]
    assert link.is_symlink()


@pytest.mark.parametrize(
    ("unit", "name"),
    [
        ("capsule@a.service", "a"),
        ("capsule@a-b_c.service", "a-b_c"),
        ("capsule@.service", None),
        ("capsule@a.target", None),
        ("foo@a.service", None),
    ],
)
def test_capsule_from_unit(unit: str, name: str | None) -> None:
    assert backend.capsule_from_unit(unit) == name
    if name is not None:
        assert backend.capsule_unit(name) == unit


# -- pinning /run/capsules/NAME/systemd/private ------------------------------------------------


@pytest.fixture
def run_capsules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run-capsules"
    root.mkdir()
    monkeypatch.setattr(capsule_socket, "RUN_CAPSULES", str(root))
    return root


def make_capsule_runtime(run_capsules: Path, name: str, uid: int = CAPSULE_UID) -> Path:
    sd = run_capsules / name / "systemd"
    sd.mkdir(parents=True)
    os.mknod(sd / "private", stat.S_IFSOCK | 0o600)  # a socket inode, no listener needed
    for p in (run_capsules / name, sd, sd / "private"):
        os.chown(p, uid, uid, follow_symlinks=False)
    return sd


@needs_root
def test_pin_accepts_a_capsule_owned_socket(run_capsules: Path) -> None:
    make_capsule_runtime(run_capsules, "a")
    fd, owner = capsule_socket.pin_capsule_socket("a")
    try:
        assert owner == CAPSULE_UID
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


@needs_root
@pytest.mark.parametrize("component", ["private", "systemd"])
def test_pin_refuses_symlinks(run_capsules: Path, tmp_path: Path, component: str) -> None:
    sd = make_capsule_runtime(run_capsules, "a")
    victim = make_capsule_runtime(tmp_path / "victim", "v")  # a socket elsewhere
    path = sd / "private" if component == "private" else sd
    if component == "private":
        path.unlink()
        path.symlink_to(victim / "private")
    else:
        os.rename(sd, run_capsules / "a" / "sd")
        path.symlink_to(victim)
    os.chown(path, CAPSULE_UID, CAPSULE_UID, follow_symlinks=False)
    with pytest.raises(capsule_socket.UnsafeSocket, match=f"{component} is a symlink"):
        capsule_socket.pin_capsule_socket("a")


@needs_root
def test_pin_refuses_system_uid_and_mixed_owners(run_capsules: Path) -> None:
    make_capsule_runtime(run_capsules, "sys", uid=0)
    with pytest.raises(capsule_socket.UnsafeSocket, match="not a dynamic user"):
        capsule_socket.pin_capsule_socket("sys")
    sd = make_capsule_runtime(run_capsules, "mixed")
    os.chown(sd / "private", 0, 0)  # e.g. a root socket hardlinked in
    with pytest.raises(capsule_socket.UnsafeSocket, match="owned by uid 0"):
        capsule_socket.pin_capsule_socket("mixed")


@needs_root
@pytest.mark.parametrize("uid", [1000, 4242, 61183, 65520, 65534])
def test_pin_refuses_owners_outside_the_dynamic_range(run_capsules: Path, uid: int) -> None:
    # DynamicUser= reuses a static user named c-NAME if one exists: a capsule manager running
    # as a real account (1000, 4242) is refused, stricter than systemd's uid_is_system() check.
    make_capsule_runtime(run_capsules, "static", uid=uid)
    with pytest.raises(capsule_socket.UnsafeSocket, match=f"uid {uid}, not a dynamic user"):
        capsule_socket.pin_capsule_socket("static")


@needs_root
@pytest.mark.parametrize("uid", [61184, 65519])
def test_pin_accepts_both_ends_of_the_dynamic_range(run_capsules: Path, uid: int) -> None:
    make_capsule_runtime(run_capsules, "edge", uid=uid)
    fd, owner = capsule_socket.pin_capsule_socket("edge")
    os.close(fd)
    assert owner == uid


@needs_root
def test_pin_refuses_wrong_type_and_missing(run_capsules: Path) -> None:
    sd = make_capsule_runtime(run_capsules, "a")
    (sd / "private").unlink()
    (sd / "private").touch()
    os.chown(sd / "private", CAPSULE_UID, CAPSULE_UID)
    with pytest.raises(capsule_socket.UnsafeSocket, match="wrong file type"):
        capsule_socket.pin_capsule_socket("a")
    with pytest.raises(capsule_socket.UnsafeSocket, match="does not exist"):
        capsule_socket.pin_capsule_socket("nope")
    for bad in ("", "..", "a/b"):
        with pytest.raises(capsule_socket.UnsafeSocket, match="invalid"):
            capsule_socket.pin_capsule_socket(bad)


@needs_root
def test_expected_uid_must_match_owner(run_capsules: Path) -> None:
    make_capsule_runtime(run_capsules, "a")
    with pytest.raises(capsule_socket.UnsafeSocket, match="not the capsule's uid"):
        capsule_socket.connect_capsule_manager("a", expected_uid=CAPSULE_UID + 1)


# --- UnitFileCounts: a count kept while no directory on the way changed ---------------------


class Walks:
    """Counts the safe walks UnitFileCounts makes (each one an open per directory)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = hostfs._walk_and_count

        def walk(name: str) -> tuple[tuple[hostfs.DirStamp, ...], int]:
            self.n += 1
            return real(name)

        monkeypatch.setattr(hostfs, "_walk_and_count", walk)


def _late() -> int:
    """A clock far past every file's ctime: nothing is too recent to keep."""
    return 2**62


def test_unit_counts_walk_once_while_nothing_changes(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = unit_dir(state_root, "a")
    (d / "web.service").touch()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert [counts.count("a") for _ in range(3)] == [1, 1, 1]
    assert walks.n == 1


def test_unit_counts_see_a_unit_added_or_removed(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = unit_dir(state_root, "a")
    (d / "web.service").touch()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a") == 1
    (d / "tick.timer").touch()
    assert counts.count("a") == 2
    (d / "web.service").unlink()
    assert counts.count("a") == 1
    assert walks.n == 3


def test_unit_counts_see_a_unit_directory_that_appears(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (state_root / "a").mkdir()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a") == 0
    assert counts.count("a") == 0
    assert walks.n == 1  # no .config: kept while the home's entries stay the same
    (unit_dir(state_root, "a") / "web.service").touch()
    assert counts.count("a") == 1


def test_a_kept_count_of_a_home_with_no_config_is_checked_without_an_fd(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (state_root / "a").mkdir()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a") == 0
    opened: list[object] = []
    real_open = os.open

    def opening(path: str, flags: int, *args: object, **kwargs: object) -> int:
        opened.append(path)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]  # as given

    with monkeypatch.context() as m:
        m.setattr(os, "open", opening)
        assert counts.count("a") == 0
    assert (opened, walks.n) == ([], 1)  # the lstat alone said unchanged


@pytest.mark.parametrize("swapped_in", ["directory", "symlink"])
def test_a_kept_count_of_a_home_with_no_config_sees_the_home_replaced(
    state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped_in: str
) -> None:
    # Kept through the state dir's stamp alone; a new home in its place (another inode, or
    # a symlink to a tree with units) is walked again, and the symlink is not followed.
    (state_root / "a").mkdir()
    outside = tmp_path / "outside"
    (outside / ".config" / "systemd" / "user").mkdir(parents=True)
    (outside / ".config" / "systemd" / "user" / "web.service").touch()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a") == 0
    (state_root / "a").rename(state_root / "a.old")
    if swapped_in == "directory":
        outside.rename(state_root / "a")
    else:
        (state_root / "a").symlink_to(outside)
    assert counts.count("a") == (1 if swapped_in == "directory" else 0)
    assert walks.n == 2


@pytest.mark.parametrize("component", [".config", ".config/systemd", ".config/systemd/user"])
def test_unit_counts_never_follow_a_symlink_swapped_in_later(
    state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, component: str
) -> None:
    # Counted once through real directories, then one of them is replaced by a symlink to a
    # tree with units outside the capsule: the kept count must not hide, nor follow, it.
    outside = tmp_path / "outside"
    (outside / ".config" / "systemd" / "user").mkdir(parents=True)
    for i in range(5):
        (outside / ".config" / "systemd" / "user" / f"root{i}.service").touch()
    (unit_dir(state_root, "a") / "web.service").touch()
    counts = hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a") == 1
    link = state_root / "a" / component
    link.rename(link.with_name(link.name + ".old"))
    link.symlink_to(outside / component)
    assert counts.count("a") == 0


@pytest.mark.parametrize("component", [".config", ".config/systemd"])
def test_checking_a_kept_count_resolves_no_path_through_the_capsules_directories(
    state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, component: str
) -> None:
    # The capsule swaps a directory for a symlink while its kept count is being checked:
    # root's lookups must not go through it (it may lead to an automount or a hung mount).
    outside = tmp_path / "outside"
    (outside / ".config" / "systemd" / "user").mkdir(parents=True)
    (unit_dir(state_root, "a") / "web.service").touch()
    counts = hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a") == 1
    link = state_root / "a" / component
    looked_up: list[str] = []
    real_open, real_lstat, real_stat = os.open, os.lstat, os.stat

    def swap_once() -> None:
        if not link.is_symlink():
            link.rename(link.with_name(link.name + ".old"))
            link.symlink_to(outside / component)

    def record(path: object, dir_fd: object) -> None:
        if dir_fd is None and isinstance(path, str):
            looked_up.append(path)
        if isinstance(path, str) and path.endswith(".config"):
            swap_once()  # right after the first look at .config (by path or by fd)

    def opening(path: str, flags: int, *args: object, **kwargs: object) -> int:
        fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]  # as given
        record(path, kwargs.get("dir_fd"))
        return fd

    def lstating(path: str, *args: object, **kwargs: object) -> os.stat_result:
        st = real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]  # as given
        record(path, kwargs.get("dir_fd"))
        return st

    def stating(path: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]  # as given
        record(path, kwargs.get("dir_fd"))
        return st

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "lstat", lstating)
    monkeypatch.setattr(os, "stat", stating)
    with monkeypatch.context() as m:
        m.setattr(hostfs, "_walk_and_count", lambda name: ((), -1))  # the check alone
        assert counts.count("a") == -1  # changed: not the kept 1
    through_link = [p for p in looked_up if p.startswith(str(link) + os.sep)]
    assert through_link == []


def test_unit_counts_keep_nothing_changed_too_recently(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Just made (the real clock): a change within the same timestamp tick could go unseen.
    (unit_dir(state_root, "a") / "web.service").touch()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts()
    assert counts.count("a") == 1
    assert counts.count("a") == 1
    assert walks.n == 2
    assert len(counts) == 0


def test_unit_counts_keep_no_answer_from_a_failed_open(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (unit_dir(state_root, "a") / "web.service").touch()
    counts = hostfs.UnitFileCounts(clock_ns=_late)
    real_open = os.open

    def no_fds(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if path == "systemd":
            raise OSError(24, "Too many open files")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]  # as given

    monkeypatch.setattr(os, "open", no_fds)
    assert counts.count("a") == 0
    monkeypatch.setattr(os, "open", real_open)
    assert counts.count("a") == 1  # the EMFILE answer was not kept


def test_unit_counts_forget_capsules_no_longer_listed(state_root: Path) -> None:
    for name in ("a", "b"):
        (unit_dir(state_root, name) / "web.service").touch()
    counts = hostfs.UnitFileCounts(clock_ns=_late)
    counts.count("a")
    counts.count("b")
    counts.forget({"b"})
    assert len(counts) == 1


def test_real_state_dirs_are_the_ones_has_state_dir_accepts(
    state_root: Path, tmp_path: Path
) -> None:
    (state_root / "a").mkdir()
    (state_root / "b").symlink_to(tmp_path)
    (state_root / "c").touch()
    (state_root / ".hidden").mkdir()
    legacy = tmp_path / "capsules"
    legacy.mkdir()
    (legacy / "d").mkdir()
    (legacy / "a").symlink_to(state_root / "a")
    dirs = hostfs.real_state_dirs()
    assert dirs.keys() == {"a", "d"}
    assert {n for n in ("a", "b", "c", "d") if hostfs.has_state_dir(n)} == dirs.keys()
    # STATE_ROOT's with the lstat a List checks its kept count by; the legacy one without.
    home = dirs["a"]
    assert home is not None
    assert hostfs._dir_stamp(home) == hostfs._dir_stamp(os.lstat(state_root / "a"))
    assert dirs["d"] is None


def test_a_kept_count_checked_against_the_listings_stat_looks_at_nothing_itself(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (state_root / "a").mkdir()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 0
    home = hostfs.real_state_dirs()["a"]
    looked: list[object] = []

    def looking(path: object, *args: object, **kwargs: object) -> None:
        looked.append(path)
        raise AssertionError("no lookup of its own")

    with monkeypatch.context() as m:
        for fn in ("open", "stat", "lstat"):
            m.setattr(os, fn, looking)
        assert counts.count("a", home) == 0
    assert (looked, walks.n) == ([], 1)


def test_a_kept_count_checked_against_the_listings_stat_sees_units_appear(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # .config made in the home moves the home's ctime: the next listing's stat differs.
    (state_root / "a").mkdir()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 0
    (unit_dir(state_root, "a") / "web.service").touch()
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 1
    assert walks.n == 2


def test_a_kept_count_checked_against_the_listings_stat_sees_the_home_replaced(
    state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (state_root / "a").mkdir()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 0
    other = tmp_path / "other"
    (other / ".config" / "systemd" / "user").mkdir(parents=True)
    (other / ".config" / "systemd" / "user" / "web.service").touch()
    (state_root / "a").rename(state_root / "a.old")
    other.rename(state_root / "a")
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 1
    assert walks.n == 2


def test_a_kept_count_of_a_home_with_units_is_checked_through_fds_even_with_the_stat(
    state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listing's stat covers the home only; the levels below are still looked at.
    (unit_dir(state_root, "a") / "web.service").touch()
    walks, counts = Walks(monkeypatch), hostfs.UnitFileCounts(clock_ns=_late)
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 1
    (state_root / "a" / ".config" / "systemd" / "user" / "tick.timer").touch()
    assert counts.count("a", hostfs.real_state_dirs()["a"]) == 2
    assert walks.n == 2
