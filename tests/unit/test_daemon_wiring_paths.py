"""daemon.unsafe_import_paths: the sys.path entries a non-root user could change, since the
helper imports some modules on first use (capsuled.methods.Deferred) and runs as root."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Mapping

from capsuled.daemon import unsafe_import_paths


def fake_stat(tree: Mapping[str, tuple[int, int]]) -> Callable[[str], os.stat_result]:
    """os.stat over {path: (uid, mode)}; anything else does not exist."""

    def lookup(path: str) -> os.stat_result:
        if path not in tree:
            raise FileNotFoundError(path)
        uid, mode = tree[path]
        return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    return lookup


DIR = stat.S_IFDIR
TREE = {
    "/": (0, DIR | 0o755),
    "/usr": (0, DIR | 0o755),
    "/usr/lib": (0, DIR | 0o755),
    "/usr/lib/python3": (0, DIR | 0o755),
    "/home": (0, DIR | 0o755),
    "/home/alice": (1000, DIR | 0o755),
    "/home/alice/lib": (0, DIR | 0o755),  # root's, but inside alice's home
    "/opt": (0, DIR | 0o755),
    "/opt/shared": (0, DIR | 0o775),  # group-writable
    "/tmp": (0, DIR | 0o1777),
    "/tmp/rootlib": (0, DIR | 0o755),  # root's, in a sticky directory
}


def test_root_owned_entries_that_nobody_else_can_write_are_safe() -> None:
    paths = ["/usr/lib/python3", "/usr/lib/python313.zip", "/tmp/rootlib"]
    assert unsafe_import_paths(paths, fake_stat(TREE)) == []


def test_entries_others_can_change_are_reported() -> None:
    paths = [
        "",  # the current directory
        "/home/alice/lib",  # a parent is alice's: she can rename lib away
        "/opt/shared",  # group-writable
        "/tmp",  # world-writable itself, sticky or not
        "/tmp/notyet",  # missing: whoever may create it in /tmp decides what it holds
        "/home/alice/lib/missing",
    ]
    assert unsafe_import_paths(paths, fake_stat(TREE)) == paths


def test_an_entry_through_a_link_is_judged_where_the_link_leads() -> None:
    # /opt/venv -> /home/alice/venv: every directory on the named path is root's, but alice
    # can rename the target's parent's content (her home) and put her own modules there.
    tree = {**TREE, "/opt/venv": (0, DIR | 0o755), "/home/alice/venv": (0, DIR | 0o755)}
    links = {"/opt/venv/lib": "/home/alice/venv/lib", "/usr/lib/python3": "/usr/lib/python3"}

    def realpath(path: str) -> str:
        return links.get(path, path)

    assert unsafe_import_paths(["/opt/venv/lib"], fake_stat(tree), realpath) == ["/opt/venv/lib"]
    assert unsafe_import_paths(["/usr/lib/python3"], fake_stat(tree), realpath) == []
    # The named path still counts: a link in alice's home to root's tree is hers to replace.
    links["/home/alice/lib"] = "/usr/lib/python3"
    assert unsafe_import_paths(["/home/alice/lib"], fake_stat(tree), realpath) == [
        "/home/alice/lib"
    ]


def test_this_interpreters_standard_library_is_safe_when_root_installed_it() -> None:
    stdlib = os.path.dirname(os.__file__)
    if os.stat(stdlib).st_uid != 0:  # a user's own Python build: nothing to say
        return
    assert unsafe_import_paths([stdlib]) == []
    assert sys.path  # the default reads sys.path
