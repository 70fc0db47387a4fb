"""The CLI's caller identity: a given token, or a dev IdP token for a dev_directory subject."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sidecar.cli_identity import IdentityOptionError, dev_directory, identity_token
from sidecar.identity import DevIdentityProvider
from tests.conftest import EXAMPLE_POLICIES


def test_a_given_token_is_used_as_is(tmp_path: Path) -> None:
    """--identity-token passes through untouched; no state directory is needed."""
    assert identity_token("a.b.c", None, tmp_path, EXAMPLE_POLICIES) == "a.b.c"


@pytest.mark.parametrize(
    ("token", "subject", "message"),
    [
        ("a.b.c", "olivia@example.com", "not both"),
        (None, None, "who is calling?"),
        (None, "olivia@example.com", "no dev IdP key"),
    ],
)
def test_unusable_identity_options_are_refused(
    tmp_path: Path, token: str | None, subject: str | None, message: str
) -> None:
    """Both options, neither, or --as without a dev IdP key are errors that say what to do."""
    with pytest.raises(IdentityOptionError, match=message):
        identity_token(token, subject, tmp_path, EXAMPLE_POLICIES)


def test_as_mints_a_dev_token_with_the_directory_groups(tmp_path: Path) -> None:
    """--as mints with the server's dev IdP key; the server's verifier accepts it, with groups."""
    idp = DevIdentityProvider.load_or_create(tmp_path, "proviso")
    token = identity_token(None, "olivia@example.com", tmp_path, EXAMPLE_POLICIES)
    caller = idp.verifier().verify(token, time.time())
    assert (caller.subject, caller.groups) == ("olivia@example.com", ("admins",))
    with pytest.raises(IdentityOptionError, match=r"did you mean 'olivia@example\.com'"):
        identity_token(None, "olivai@example.com", tmp_path, EXAMPLE_POLICIES)


def test_the_dev_directory_is_read_from_a_broken_bundle(tmp_path: Path) -> None:
    """A bundle with an error elsewhere still yields its dev subjects (to reload the fix)."""
    (tmp_path / "dev.yaml").write_text("dev_directory:\n  a@x: {groups: [admins]}\n")
    (tmp_path / "broken.yaml").write_text("tools: [\n")
    assert dev_directory(tmp_path) == {"a@x": ("admins",)}
