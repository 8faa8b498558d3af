"""hostfs.CgroupFiles: a running capsule's accounting files kept open between reads, against a
temp directory standing in for /sys/fs/cgroup. What a kernfs file does that a temp file does not
(a read on an fd of a removed cgroup fails with ENODEV) is stood in for by a kept fd made to fail;
tests/e2e/test_lifecycle.py's restart test reads the real thing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from capsuled.systemd import hostfs

GROUP = "/capsule.slice/capsule@a.service"


@pytest.fixture
def cgroups(tmp_path: Path) -> Iterator[tuple[Path, hostfs.CgroupFiles]]:
    group = tmp_path / GROUP.lstrip("/")
    group.mkdir(parents=True)
    files = hostfs.CgroupFiles(root=str(tmp_path), max_kept=2)
    yield tmp_path, files
    files.close()


def _counting_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real: Callable[..., int] = os.open

    def counting(path: str, flags: int, *args: object, **kwargs: object) -> int:
        opened.append(path)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return opened


def test_every_read_gives_the_file_as_it_is_now_through_the_fd_it_kept(
    cgroups: tuple[Path, hostfs.CgroupFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, files = cgroups
    path = root / GROUP.lstrip("/") / "memory.current"
    path.write_bytes(b"4096\n")
    opened = _counting_opens(monkeypatch)
    assert files.read(GROUP, "memory.current") == b"4096\n"
    with path.open("r+b") as f:  # changed in place, as the kernel's figure changes
        f.write(b"8192\n")
    assert files.read(GROUP, "memory.current") == b"8192\n"
    assert [p for p in opened if p.endswith("memory.current")] == [str(path)]  # once
    assert files.kept_fds() == 1


def test_a_kept_fd_that_cannot_be_read_is_dropped_with_its_cgroups_and_the_path_opened_again(
    cgroups: tuple[Path, hostfs.CgroupFiles], tmp_path: Path
) -> None:
    root, files = cgroups
    group = root / GROUP.lstrip("/")
    (group / "memory.current").write_bytes(b"1\n")
    (group / "cpu.stat").write_bytes(b"usage_usec 5\n")
    assert files.read(GROUP, "memory.current") == b"1\n"
    assert files.read(GROUP, "cpu.stat") == b"usage_usec 5\n"
    # The cgroup is removed and made again at the same path (a restart): the kernel then fails
    # every read on the old fds. Stood in for by a directory put under the kept fd's number
    # (pread on it fails, EISDIR), the files replaced by new ones.
    kept = dict(files._kept[GROUP])  # the fds the reader holds now
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.dup2(directory, kept["memory.current"])
    finally:
        os.close(directory)
    for name, text in (("memory.current", b"2\n"), ("cpu.stat", b"usage_usec 1\n")):
        (group / name).unlink()
        (group / name).write_bytes(text)
    assert files.read(GROUP, "memory.current") == b"2\n"
    # Every fd of the old cgroup went with the one that failed: cpu.stat is the new one's too.
    assert files.read(GROUP, "cpu.stat") == b"usage_usec 1\n"
    assert files.kept_fds() == 2


def test_a_missing_file_is_looked_for_again_at_every_read(
    cgroups: tuple[Path, hostfs.CgroupFiles],
) -> None:
    root, files = cgroups
    assert files.read(GROUP, "pids.current") is None
    assert files.read("/no/such.service", "pids.current") is None
    assert files.kept_fds() == 0
    (root / GROUP.lstrip("/") / "pids.current").write_bytes(b"3\n")  # its controller enabled
    assert files.read(GROUP, "pids.current") == b"3\n"


def test_the_least_recently_read_cgroups_fds_are_closed_past_the_bound(
    cgroups: tuple[Path, hostfs.CgroupFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, files = cgroups
    groups = [f"/capsule.slice/capsule@{n}.service" for n in "bcd"]
    for group in groups:
        (root / group.lstrip("/")).mkdir(parents=True)
        (root / group.lstrip("/") / "cpu.stat").write_bytes(b"usage_usec 1\n")
    for group in groups[:2]:
        files.read(group, "cpu.stat")
    files.read(groups[0], "cpu.stat")  # b is now the most recently read
    files.read(groups[2], "cpu.stat")  # a third cgroup: c's fd is closed (bound 2)
    assert files.kept_fds() == 2
    opened = _counting_opens(monkeypatch)
    files.read(groups[0], "cpu.stat")
    files.read(groups[2], "cpu.stat")
    assert opened == []
    files.read(groups[1], "cpu.stat")
    assert len(opened) == 1


def test_forget_closes_a_cgroups_fds(cgroups: tuple[Path, hostfs.CgroupFiles]) -> None:
    root, files = cgroups
    (root / GROUP.lstrip("/") / "cpu.stat").write_bytes(b"usage_usec 1\n")
    files.read(GROUP, "cpu.stat")
    fd = files._kept[GROUP]["cpu.stat"]
    files.forget(GROUP)
    assert files.kept_fds() == 0
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    files.forget(GROUP)  # nothing kept: nothing to do


def test_the_figures_come_through_the_helpers_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = hostfs.CgroupFiles(root=str(tmp_path))
    monkeypatch.setattr(hostfs, "CGROUP_FILES", table)
    group = tmp_path / GROUP.lstrip("/")
    group.mkdir(parents=True)
    (group / "memory.current").write_bytes(b"4096\n")
    (group / "pids.current").write_bytes(b"max\n")
    (group / "cpu.stat").write_bytes(b"user_usec 1\nusage_usec 7\n")
    try:
        assert hostfs.cgroup_memory_current(GROUP) == 4096
        assert hostfs.cgroup_tasks_current(GROUP) is None  # not a number
        assert hostfs.cgroup_cpu_usage_nsec(GROUP) == 7000
        assert table.kept_fds() == 3
        hostfs.forget_cgroup(GROUP)
        assert table.kept_fds() == 0
    finally:
        table.close()


def test_a_file_whose_controller_the_root_does_not_offer_is_not_looked_for(
    cgroups: tuple[Path, hostfs.CgroupFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, files = cgroups
    controllers = root / "cgroup.controllers"
    controllers.write_bytes(b"cpuset cpu io\n")  # a v1 hybrid host: memory and pids are v1's
    (root / GROUP.lstrip("/") / "cpu.stat").write_bytes(b"usage_usec 1\n")
    opened = _counting_opens(monkeypatch)
    assert files.read(GROUP, "memory.current") is None
    assert files.read(GROUP, "pids.current") is None
    assert files.read(GROUP, "cpu.stat") == b"usage_usec 1\n"
    assert opened == [str(controllers), f"{root}{GROUP}/cpu.stat"]
    # The root's list is read anew each time: a controller offered from now on is seen now.
    (root / GROUP.lstrip("/") / "memory.current").write_bytes(b"4096\n")
    with controllers.open("r+b") as f:
        f.write(b"cpuset cpu io memory\n")
    assert files.read(GROUP, "memory.current") == b"4096\n"
    assert files.read(GROUP, "pids.current") is None
    assert opened[2:] == [f"{root}{GROUP}/memory.current"]  # pids is still not offered
