"""The demo's step file (tests/testbed/demo.toml) parses, and malformed ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.demo import DEFAULT_STEPS, StepError, load_steps


def test_shipped_steps_load_and_cover_the_story() -> None:
    steps = load_steps(DEFAULT_STEPS)
    commands = [" ".join(s.run) for s in steps]
    for verb in ("create", "install-unit", "start", "status", "logs", "stop", "remove"):
        assert any(f"capsulectl {verb} demo" in c for c in commands), verb
    refused_users = {s.user for s in steps if not s.expect_ok and s.run[0] == "capsulectl"}
    assert {"bob", "mallory"} <= refused_users
    assert all("{capsule}" not in c for c in commands)


def test_capsule_name_can_be_overridden() -> None:
    steps = load_steps(DEFAULT_STEPS, capsule="t-1234")
    assert any("t-1234" in s.run for s in steps)
    assert not any("demo" in s.run for s in steps)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[step]]\nsay="x"\nuser="eve"\nrun=["id"]\n', "unknown user"),
        ('[[step]]\nsay="x"\nuser="alice"\nrun="id"\n', "'run' must be"),
        ('[[step]]\nsay="x"\nuser="alice"\nrun=["id"]\nexpect="maybe"\n', "'expect'"),
        ('[[step]]\nsay="x"\nuser="alice"\nrun=["id"]\ntypo=1\n', "unknown keys"),
        ('[[step]]\nuser="alice"\nrun=["id"]\n', "'say' must be"),
        ('capsule = "demo"\n', "needs capsule"),
    ],
)
def test_malformed_steps_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "steps.toml"
    path.write_text(body)
    with pytest.raises(StepError, match=message):
        load_steps(path)
