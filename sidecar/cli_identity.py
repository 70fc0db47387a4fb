"""Who the CLI is when it talks to a running server: an identity token in the metadata.

Every command that calls a server (DESIGN.md §5) takes ``--target`` and a caller identity:
``--identity-token JWT`` from the company IdP, or, in dev mode, ``--as SUBJECT``, which mints a
short-lived identity token with the dev IdP key that ``serve`` keeps in its state directory,
for a subject of the policy's ``dev_directory`` and with that subject's groups.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from sidecar import config
from sidecar.identity import DevIdentityProvider, dev_idp_key_path
from sidecar.policy.loader import policy_files, read_text
from sidecar.policy.policy_format import did_you_mean
from sidecar.policy.yamlnodes import parse_yaml

DEFAULT_TARGET = "127.0.0.1:50051"
DEV_TOKEN_TTL_SECONDS = 300


class IdentityOptionError(Exception):
    """The identity options do not name a usable identity; the message says what to fix."""


_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")
"""Target prefixes gRPC resolves itself (its naming doc); passed on as given."""


def target(text: str) -> str:
    """A ``--target`` value, for argparse: HOST:PORT with a port of 1-65535 (or a target in
    one of gRPC's own naming schemes), refused here rather than by a connection that fails.

    Raises:
        argparse.ArgumentTypeError: not HOST:PORT, or the port is out of range.
    """
    if text.startswith(_GRPC_SCHEMES):
        return text
    try:
        address = config.Address.parse(text, "--target")
    except config.SettingsError:
        address = None
    if address is None or not 1 <= address.port <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port of 1-65535, got {text!r}")
    return text


MAX_TIMEOUT_SECONDS = 86400.0
"""A day: gRPC's deadline overflows near 9.2e9 s and then fails the call at once."""


def timeout(text: str) -> float:
    """A ``--timeout`` value in seconds, for argparse: above zero, at most a day.

    Raises:
        argparse.ArgumentTypeError: not a number, or out of that range.
    """
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:  # False for NaN too
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:g}, "
            f"got {text!r}"
        )
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target`` and the identity options, shared by every command that calls a server."""
    parser.add_argument("--target", type=target, default=DEFAULT_TARGET, metavar="HOST:PORT")
    parser.add_argument(
        "--identity-token", metavar="JWT", help="an identity token from the IdP (production)"
    )
    parser.add_argument(
        "--as",
        dest="as_subject",
        metavar="SUBJECT",
        help="dev mode: mint an identity for SUBJECT of the policy's dev_directory",
    )
    parser.add_argument(
        "--state-dir",
        default=config.DEFAULT_STATE_DIR,
        metavar="DIR",
        help="with --as: the dev server's state directory (its dev IdP key)",
    )
    parser.add_argument(
        "--policies",
        default="policies",
        metavar="DIR",
        help="with --as: the bundle whose dev_directory gives the subject's groups",
    )
    parser.add_argument("--timeout", type=timeout, default=10.0, metavar="SECONDS")


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the caller's identity token.

    Raises:
        IdentityOptionError: no identity, both kinds, or a dev identity that cannot be minted.
    """
    token = identity_token(
        args.identity_token, args.as_subject, Path(args.state_dir), Path(args.policies)
    )
    return (("authorization", f"Bearer {token}"),)


def identity_token(
    identity_token: str | None, as_subject: str | None, state_dir: Path, policies: Path
) -> str:
    """The token given, or one minted by the dev IdP for ``as_subject``.

    Raises:
        IdentityOptionError: see ``metadata``.
    """
    if identity_token and as_subject:
        raise IdentityOptionError("give --identity-token or --as, not both")
    if identity_token:
        return identity_token
    if not as_subject:
        raise IdentityOptionError(
            "who is calling? give --identity-token JWT, or --as SUBJECT against a dev-mode server"
        )
    return dev_identity_token(as_subject, state_dir, policies, time.time())


def dev_identity_token(
    subject: str,
    state_dir: Path,
    policies: Path,
    now: float,
    *,
    audience: str = config.DEFAULT_AUDIENCE,
) -> str:
    """A short-lived dev IdP token for a ``dev_directory`` subject, with its groups.

    Raises:
        IdentityOptionError: no dev IdP key in ``state_dir``, or a subject the bundle's dev
            directory does not list.
    """
    try:
        idp = DevIdentityProvider.load(state_dir, audience)
    except FileNotFoundError:
        raise IdentityOptionError(
            f"no dev IdP key at {dev_idp_key_path(state_dir)}: --as works only against a "
            "dev-mode server; pass its --state-dir (or use --identity-token)"
        ) from None
    directory = dev_directory(policies)
    groups = directory.get(subject)
    if groups is None:
        hint = did_you_mean(subject, directory)
        raise IdentityOptionError(
            f"'{subject}' is not in the dev_directory of {policies}"
            + (f" ({hint})" if hint else "")
        )
    return idp.mint(subject, groups, now, DEV_TOKEN_TTL_SECONDS)


def dev_directory(policies: Path) -> dict[str, tuple[str, ...]]:
    """The ``dev_directory`` entries of a bundle, read even when other parts have errors.

    An admin whose edit broke the bundle still needs to call ``policy reload`` to see why, so
    this reads only the section it needs, from every file that parses.
    """
    if not policies.is_dir():
        raise IdentityOptionError(f"--policies {policies} is not a directory")
    found: dict[str, tuple[str, ...]] = {}
    for name in policy_files(policies):
        text = read_text(policies, name, [])
        document = parse_yaml(text, name)[0] if text is not None else None
        value = document.value if document is not None else None
        section = value.get("dev_directory") if isinstance(value, dict) else None
        for subject, entry in section.items() if isinstance(section, dict) else ():
            groups = entry.get("groups") if isinstance(entry, dict) else None
            if isinstance(groups, list) and all(isinstance(g, str) for g in groups):
                found.setdefault(subject, tuple(groups))
    return found
