"""capsulectl: manage the systemd capsules capsuled lets you manage (CLI and Python API).

`capsulectl.Client` is the Python API (capsulectl.client); it is imported on first use so that
`capsulectl --version` and the CLI's start-up do not pay for the protocol core until they need it.
"""

from __future__ import annotations

__all__ = ["Client", "__version__"]

# Kept equal to pyproject.toml's version by tests/unit/test_cli.py (reading package metadata at
# start-up would cost more than the rest of `capsulectl --version`).
__version__ = "0.1.0"

# Not typing.TYPE_CHECKING: importing typing costs more than the rest of `capsulectl --version`
# (mypy treats the name as true all the same).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from capsulectl.client import Client


def __getattr__(name: str) -> object:
    if name == "Client":
        from capsulectl.client import Client

        return Client
    raise AttributeError(f"module 'capsulectl' has no attribute {name!r}")
