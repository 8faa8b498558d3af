"""capsuled: the root Varlink helper. Importing it (or a subpackage) starts nothing.

`__version__` is kept equal to pyproject.toml's version by tests/unit/test_cli.py, as
capsulectl's is: reading the package metadata (importlib.metadata, which pulls in the email
package) cost ~10 ms of every socket-activated start, for one string (issue 12).
"""

__version__ = "0.1.0"
