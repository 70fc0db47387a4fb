"""The ``proviso`` command.

Exit codes: 0 success, 1 a refusal or a failed check, 2 usage (and 141, quietly, when the
reader of the output stops reading, as ``head`` does). Human output by default,
``--format json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf import json_format

from sidecar import cli_identity, config
from sidecar.audit.chain import ChainState
from sidecar.audit.files import AuditLogNotFoundError, log_stem, logs, records, verify_log
from sidecar.audit.writer import AuditLogCorruptError, AuditLogInUseError
from sidecar.durations import parse_duration
from sidecar.errors import (
    PolicyLoadError,
    ShadowPolicyLoadError,
    SidecarError,
    StoreUnavailableError,
)
from sidecar.keystore import (
    has_key_ring,
    key_statuses,
    load_or_create,
    load_verification_keys,
    rotate,
)
from sidecar.minting import mint
from sidecar.observability import logging as json_logging
from sidecar.policy.issues import Severity, format_issues
from sidecar.policy.loader import lint_policy, load_policy
from sidecar.terminal import shown
from tokens import (
    Constraint,
    Grant,
    KeyFormatError,
    TokenError,
    TokenRevokedError,
    VerificationKeys,
    verify,
    verify_call,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
DEFAULT_TARGET = cli_identity.DEFAULT_TARGET


class UsageError(Exception):
    """Bad command-line input: exit 2."""


class NoStateDirError(Exception):
    """A command that only reads the state directory was pointed at none: exit 1."""


def existing_state_dir(text: str) -> Path:
    """``--state-dir`` for a command that only reads it: it must exist, for a typo must not
    create an empty state directory (and then report an empty key list or unknown keys).

    Raises:
        NoStateDirError: there is no directory at ``text``.
    """
    path = Path(text)
    if not path.is_dir():
        raise NoStateDirError(
            f"no state directory at {path} (start `proviso serve --state-dir {path}` "
            "or pass the right --state-dir)"
        )
    return path


def nonempty_run_id(text: str) -> str:
    """A run id to look for in the audit log, for argparse: not empty, since a Check without
    one belongs to no run (an unset shell variable would otherwise select every such Check).

    Raises:
        argparse.ArgumentTypeError: it is empty.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected a run id, got an empty one")
    return text


def count(text: str) -> int:
    """A whole number of zero or more, for argparse.

    Raises:
        argparse.ArgumentTypeError: it is not one.
    """
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got {text!r}")
    return int(text)


def _call(
    args: argparse.Namespace,
    stub_type: Callable[[grpc.Channel], Any],
    method: str,
    request: Any,
    metadata: Sequence[tuple[str, str]] = (),
) -> Any | None:
    """One unary call to the server at ``--target``; on an RPC error, say it and return None."""
    with grpc.insecure_channel(args.target) as channel:
        try:
            return getattr(stub_type(channel), method)(
                request, metadata=metadata, timeout=args.timeout
            )
        except grpc.RpcError as exc:
            _rpc_failed(exc, args.target)
            return None


def _fail(message: str, code: int = EXIT_REFUSED) -> int:
    print(f"proviso: {message}", file=sys.stderr)
    return code


_CONNECT_FAILURES = ("failed to connect", "dns resolution failed", "connection refused")
"""How gRPC words an UNAVAILABLE that never reached a server (lower case)."""


def _rpc_failed(exc: grpc.RpcError, target: str, prefix: str = "") -> int:
    """Say why a call failed, and where to look when no server answered at ``target``.

    Every command that calls a server reports its RPC errors here. An UNAVAILABLE from a
    server that answered (it could not decide safely) gets no hint: only connection failures.
    """
    code: grpc.StatusCode = exc.code()
    details = str(exc.details() or "")
    _fail(f"{prefix}{code.name}: {details}")
    if code is grpc.StatusCode.UNAVAILABLE and any(
        failure in details.lower() for failure in _CONNECT_FAILURES
    ):
        print(f"proviso: is proviso running at {target}? (--target)", file=sys.stderr)
    return EXIT_REFUSED


# ---------------------------------------------------------------- serve


def serve_settings(args: argparse.Namespace) -> config.Settings:
    """The settings ``serve`` runs with: its flags, then PROVISO_* variables, then defaults.

    Raises:
        config.SettingsError: a value is invalid; the message names the flag.
    """
    return config.build(
        policies=args.policies,
        listen=args.listen,
        metrics_listen=args.metrics_listen,
        state_dir=args.state_dir,
        idp_jwks=args.idp_jwks,
        idp_issuer=args.idp_issuer,
        idp_ca_file=args.idp_ca_file,
        token_leeway=args.token_leeway,
        log_level=args.log_level,
        shadow_policies=args.shadow_policies,
        watch_interval=args.watch_interval,
        workers=args.workers,
        max_in_flight=args.max_in_flight,
        audit_group_commit=args.audit_group_commit,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the sidecar until SIGINT or SIGTERM."""
    try:
        settings = serve_settings(args)
    except config.SettingsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    json_logging.configure(settings.log_level)
    try:
        if settings.workers > 1:
            return _serve_workers(settings)
        return asyncio.run(_serve(settings))
    except ShadowPolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"shadow policy bundle {settings.shadow_policies} has errors; not serving")
    except PolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"policy bundle {settings.policies} has errors; not serving")
    except (AuditLogCorruptError, AuditLogInUseError) as exc:
        return _fail(f"not serving: {exc}")
    except (StoreUnavailableError, OSError, ValueError) as exc:
        return _fail(f"cannot start: {exc}")


def _announce_callers(settings: config.Settings, target: str) -> None:
    """Say loudly when dev mode is on, and how an issuer gets a token from this server."""
    if settings.dev_mode:
        print(
            "proviso: WARNING dev mode: no IdP configured; the dev IdP in "
            f"{settings.state_dir / 'dev-idp'} is trusted for issuers, approvers and admins. "
            "Never use dev mode in production (configure --idp-jwks).",
            file=sys.stderr,
            flush=True,
        )
        print(
            "proviso: dev issuer credential: --as orchestrator@service mints it from the dev "
            f"IdP in {settings.state_dir} (or pass --identity-token JWT from your IdP), e.g.\n"
            f"  proviso token issue --as orchestrator@service --state-dir {settings.state_dir} "
            f"--target {target} --agent billing-resolution-agent@service "
            "--grant 'requestRefund:invoice_id=in_93K2,amount<=50,currency in USD|EUR' --ttl 15m",
            flush=True,
        )
    else:
        print(
            f"proviso: issuers mint with: proviso token issue --identity-token JWT "
            f"--target {target} --agent AGENT --grant TOOL[:ARG=VALUE,...]",
            flush=True,
        )


def _serve_workers(settings: config.Settings) -> int:
    """``serve --workers N``: N processes on one port, supervised by this one."""
    from sidecar import supervisor  # noqa: PLC0415 - keep `proviso lint` and `check` fast

    policy = load_policy(settings.policies)  # errors are reported here, before any worker
    if settings.shadow_policies is not None:
        try:
            load_policy(settings.shadow_policies)
        except PolicyLoadError as exc:
            raise ShadowPolicyLoadError(exc.issues) from None
    try:
        workers = supervisor.start_workers(settings)
    except supervisor.WorkerStartError as exc:
        return _fail(f"cannot start: {exc}")
    target = str(replace(settings.listen, port=workers[0].grpc_port))
    print(
        f"proviso: serving gRPC on {target} ({len(workers)} worker processes, SO_REUSEPORT)",
        flush=True,
    )
    for worker in workers:
        print(
            f"proviso: worker {worker.index} pid {worker.pid}: metrics on "
            f"http://{replace(settings.metrics_listen, port=worker.metrics_port)}/metrics, "
            f"audit chain {worker.audit_path}",
            flush=True,
        )
    print(f"proviso: policy {settings.policies} version {policy.version}", flush=True)
    _announce_callers(settings, target)
    status = supervisor.supervise(workers)
    print("proviso: stopped", flush=True)
    return status


async def _serve(settings: config.Settings) -> int:
    from sidecar.app import App, freeze_startup_heap  # noqa: PLC0415 - keep `lint` fast to start

    app = await App.start(settings)
    freeze_startup_heap()
    policy = app.policy.current
    target = str(replace(settings.listen, port=app.grpc_port))
    metrics = replace(settings.metrics_listen, port=app.http.port)
    print(f"proviso: serving gRPC on {target}", flush=True)
    print(f"proviso: metrics on http://{metrics}/metrics", flush=True)
    print(f"proviso: policy {settings.policies} version {policy.version}", flush=True)
    print(f"proviso: audit log {settings.audit_path}", flush=True)
    if app.shadow is not None:
        shadow = app.shadow.current
        print(
            f"proviso: shadow policy {settings.shadow_policies} version {shadow.version} "
            "(evaluated beside the active one; never decides)",
            flush=True,
        )
    _announce_callers(settings, target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app.reload_on_sighup()
    broken = await app.serve_until(stop)
    if broken:
        print(f"proviso: the audit log refuses every record ({broken}); stopping", flush=True)
    else:
        print("proviso: stopping (finishing calls in flight)", flush=True)
    await app.stop()
    print("proviso: stopped", flush=True)
    return EXIT_REFUSED if broken else EXIT_OK


# ---------------------------------------------------------------- lint


def cmd_lint(args: argparse.Namespace) -> int:
    """Print every problem of a policy bundle; exit 1 if any is an error."""
    directory = Path(args.directory)
    if not directory.is_dir():
        return _fail(f"{directory} is not a directory", EXIT_USAGE)
    issues = lint_policy(directory)
    if args.format == "json" or issues:
        print(format_issues(issues, args.format))
    if any(issue.severity is Severity.ERROR for issue in issues):
        return EXIT_REFUSED
    if args.format == "text":
        print(f"{directory}: ok", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- test


def cmd_test(args: argparse.Namespace) -> int:
    """Run the policy unit tests (*_test.yaml) of a bundle; exit 1 if any case fails."""
    from sidecar import policytests  # noqa: PLC0415 - keep other commands fast to start

    directory = Path(args.directory)
    if not directory.is_dir():
        return _fail(f"{directory} is not a directory", EXIT_USAGE)
    report = policytests.run_suite(directory)
    if args.junit:
        try:
            Path(args.junit).write_bytes(policytests.to_junit(report))
        except OSError as exc:
            return _fail(f"cannot write {args.junit}: {exc.strerror or exc}")
    if args.format == "json":
        print(policytests.to_json(report))
    else:
        print(policytests.format_text(report))
    return EXIT_OK if report.ok else EXIT_REFUSED


# ---------------------------------------------------------------- tokens


_OPERATORS = ("<=", ">=")
_NAME_SEPARATORS = frozenset("=<>|,")
"""Characters that end an argument name in --grant: a name holding one was misparsed."""


def _is_pin(item: str) -> bool:
    """Whether ``item`` is ``ARG=VALUE``: an ``=`` whose left side is a plain name (so
    ``query=cats in hats`` pins ``query``, while ``amount<=5`` and ``c in a=b`` constrain)."""
    name, sep, _ = item.partition("=")
    return bool(sep) and not any(mark in name for mark in ("<", ">", " in "))


def _constraint_item(item: str) -> tuple[str, str, object] | None:
    """``ARG<=N``, ``ARG>=N`` or ``ARG in A|B`` as (argument, operator, operand); else None.

    Values of a set are stripped, as the operators' operands are (``USD | EUR`` is USD, EUR).
    """
    name, sep, values = item.partition(" in ")
    if sep:
        return name.strip(), "in", [value.strip() for value in values.split("|")]
    for operator in _OPERATORS:
        name, sep, bound = item.partition(operator)
        if sep:
            return name.strip(), operator, bound.strip()
    return None


def _argument_name(text: str, name: str) -> str:
    """``name`` if it can be an argument name; a usage error if the item was misread."""
    if not name or any(c.isspace() or c in _NAME_SEPARATORS for c in name):
        raise UsageError(
            f"--grant {text!r}: {name!r} is not an argument name "
            "(write ARG=VALUE, ARG<=N, ARG>=N or ARG in A|B, one per comma)"
        )
    return name


def parse_grant(text: str) -> Grant:
    """``TOOL[:ITEM,...]`` into a Grant; an ITEM is a pin ``ARG=VALUE`` or a constraint
    ``ARG<=N``, ``ARG>=N`` (decimals, inclusive) or ``ARG in A|B|C``.

    Spaces around names, operators and values are not part of them; an argument name never
    holds ``= < > | ,`` or spaces, and a set never lists an empty value, so an item is read
    as what it looks like or refused (never a constraint on an argument named ``query=cats``).
    """
    tool, _, item_text = text.partition(":")
    if not tool:
        raise UsageError(f"--grant {text!r}: expected TOOL[:ARG=VALUE,ARG<=N,ARG in A|B,...]")
    pins: dict[str, str] = {}
    bounds: dict[str, dict[str, object]] = {}
    for item in filter(None, (part.strip() for part in item_text.split(","))):
        constraint = None if _is_pin(item) else _constraint_item(item)
        if constraint is not None:
            name, operator, operand = constraint
            key = {"<=": "max", ">=": "min", "in": "one_of"}[operator]
            if not name or not operand or key in bounds.get(name, {}):
                raise UsageError(f"--grant {text!r}: constraint {item!r} is empty or repeated")
            if isinstance(operand, list) and not all(operand):
                raise UsageError(f"--grant {text!r}: constraint {item!r} lists an empty value")
            bounds.setdefault(_argument_name(text, name), {})[key] = operand
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise UsageError(
                f"--grant {text!r}: {item!r} is not ARG=VALUE, ARG<=N, ARG>=N or ARG in A|B"
            )
        if name in pins:
            raise UsageError(f"--grant {text!r}: pin {name!r} given twice")
        if value[0] in "<>=":
            raise UsageError(f"--grant {text!r}: {item!r} is ambiguous (a pin or a bound?)")
        pins[_argument_name(text, name)] = value
    try:
        constraints = {name: Constraint(**spec) for name, spec in bounds.items()}  # type: ignore[arg-type]
        return Grant(tool=tool, pins=MappingProxyType(pins), constraints=constraints)
    except ValueError as exc:
        raise UsageError(f"--grant {text!r}: {exc}") from None


def lifetime(text: str) -> int:
    """A ``--ttl`` value in seconds, for argparse: a positive duration such as 15m.

    Zero is refused rather than passed on: the API reads a zero TTL as "the longest allowed",
    the opposite of what ``--ttl 0s`` says.

    Raises:
        argparse.ArgumentTypeError: not a duration, or not longer than zero.
    """
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a lifetime: give a positive duration such as 5m"
        )
    return seconds


def _served_token(response: Any) -> dict[str, object]:
    """What ``_print_minted`` shows of an IssueTokenResponse or AttenuateTokenResponse."""
    return {
        "token": response.token,
        "token_id": response.token_id,
        "key_id": response.key_id,
        "expires_at": response.expire_time.seconds,
    }


def _print_minted(fields: dict[str, object], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(fields))
    else:
        print(fields["token"])


def _grant_messages(grants: Sequence[Grant]) -> list[object]:
    from sidecar.server.convert import grant_message  # noqa: PLC0415

    return [grant_message(grant) for grant in grants]


def cmd_token_issue(args: argparse.Namespace) -> int:
    """Mint a capability token within the agent's ceiling: through a running sidecar as an
    issuer (--as or --identity-token), or else with the local key in --state-dir."""
    ttl: int = args.ttl
    try:
        grants = [parse_grant(g) for g in args.grant]
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if args.identity_token or args.as_subject:
        return _issue_remote(args, grants, ttl)
    try:
        policy = load_policy(Path(args.policies))
    except PolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"policy bundle {args.policies} has errors")
    had_keys = has_key_ring(Path(args.state_dir))
    keys = load_or_create(Path(args.state_dir))
    if not had_keys:
        # A typo in --state-dir would otherwise mint, silently, with a key no sidecar trusts.
        print(
            f"proviso: created a new signing key in {args.state_dir} (there was none); only a "
            f"sidecar serving with --state-dir {args.state_dir} accepts this token",
            file=sys.stderr,
        )
    try:
        minted = mint(
            policy,
            keys.active,
            agent=args.agent,
            grants=grants,
            ttl_seconds=ttl,
            now=time.time(),
            issuer=args.issuer,
            audience=args.audience,
            run_id=args.run_id,
        )
    except SidecarError as exc:
        return _fail(f"refused: {exc}")
    _record_local(Path(args.state_dir), minted.token_id, args.agent, minted.expires_at)
    _print_minted(
        {
            "token": minted.token,
            "token_id": minted.token_id,
            "key_id": minted.key_id,
            "expires_at": minted.expires_at,
            "ttl_seconds": minted.ttl_seconds,
        },
        args.format,
    )
    if args.format == "text" and minted.ttl_seconds < ttl:
        print(f"proviso: ttl capped at {minted.ttl_seconds}s by the role", file=sys.stderr)
    return EXIT_OK


def _record_local(state_dir: Path, token_id: str, agent: str, expires_at: int) -> None:
    """Remember a locally minted token in the state store, so issuers can revoke it by id."""
    from sidecar.state import IssuedToken  # noqa: PLC0415
    from sidecar.state.sqlite import SQLiteStore  # noqa: PLC0415

    store = SQLiteStore(state_dir / "state.db")
    try:
        store.record_issued(IssuedToken(token_id, agent, "local-key", expires_at))
    finally:
        store.close()


def _issue_remote(args: argparse.Namespace, grants: Sequence[Grant], ttl: int) -> int:
    from google.protobuf.duration_pb2 import Duration  # noqa: PLC0415

    from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import token_service_pb2_grpc as token_grpc  # noqa: PLC0415

    try:
        metadata = cli_identity.metadata(args)
    except cli_identity.IdentityOptionError as exc:
        return _fail(str(exc), EXIT_USAGE)
    request = token_pb.IssueTokenRequest(
        agent=args.agent,
        grants=_grant_messages(grants),  # type: ignore[arg-type]
        ttl=Duration(seconds=ttl),
        run_id=args.run_id or "",
    )
    response = _call(args, token_grpc.TokenServiceStub, "IssueToken", request, metadata)
    if response is None:
        return EXIT_REFUSED
    _print_minted(_served_token(response), args.format)
    return EXIT_OK


def cmd_token_attenuate(args: argparse.Namespace) -> int:
    """Derive a narrower child of a token from a running sidecar (the token is the credential)."""
    from google.protobuf.duration_pb2 import Duration  # noqa: PLC0415

    from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import token_service_pb2_grpc as token_grpc  # noqa: PLC0415

    ttl: int = args.ttl or 0  # 0: until the parent expires
    try:
        grants = [parse_grant(g) for g in args.grant]
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    request = token_pb.AttenuateTokenRequest(
        parent_token=args.token,
        grants=_grant_messages(grants),  # type: ignore[arg-type]
        ttl=Duration(seconds=ttl),
        run_id=args.run_id or "",
    )
    response = _call(args, token_grpc.TokenServiceStub, "AttenuateToken", request)
    if response is None:
        return EXIT_REFUSED
    fields = {**_served_token(response), "parent_token_ids": list(response.parent_token_ids)}
    _print_minted(fields, args.format)
    return EXIT_OK


def unverified_claims(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """The header and payload of a compact JWS, decoded WITHOUT checking anything.

    For display and for naming a token (its jti) only; never for a decision.

    Raises:
        UsageError: the text is not three base64url segments of JSON objects.
    """
    import base64  # noqa: PLC0415

    parts = token.strip().split(".")
    if len(parts) != 3:
        raise UsageError("not a compact JWS (three dot-separated segments)")
    try:
        decoded = [
            json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
            for part in parts[:2]
        ]
    except ValueError:
        raise UsageError("the token's header or payload is not base64url JSON") from None
    if not all(isinstance(part, dict) for part in decoded):
        raise UsageError("the token's header or payload is not a JSON object")
    return decoded[0], decoded[1]


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke a token (and every token attenuated from it) on a running sidecar: issuers of
    the token's agent, or admins."""
    from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import token_service_pb2_grpc as token_grpc  # noqa: PLC0415

    try:
        if bool(args.token_id) == bool(args.token):
            raise UsageError("name the token: --token-id JTI or --token TOKEN")
        token_id = args.token_id or str(unverified_claims(args.token)[1].get("jti", ""))
        metadata = cli_identity.metadata(args)
    except (UsageError, cli_identity.IdentityOptionError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    request = token_pb.RevokeTokenRequest(token_id=token_id, reason=args.reason)
    response = _call(args, token_grpc.TokenServiceStub, "RevokeToken", request, metadata)
    if response is None:
        return EXIT_REFUSED
    revoked = json_format.MessageToDict(response, preserving_proto_field_name=True)
    if args.format == "json":
        print(json.dumps(revoked, indent=2))
    else:
        state = "revoked" if response.created else "already revoked"
        print(f"{token_id}: {state} by {response.revocation.revoked_by}: "
              f"{response.revocation.reason}")  # fmt: skip
    return EXIT_OK


def _inspect_keys(args: argparse.Namespace) -> VerificationKeys:
    if args.jwks:
        return VerificationKeys.from_jwks(json.loads(Path(args.jwks).read_text()))
    if args.target:
        from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb  # noqa: PLC0415
        from sidecar._proto.proviso.v1 import token_service_pb2_grpc as token_grpc  # noqa: PLC0415

        with grpc.insecure_channel(args.target) as channel:
            response = token_grpc.TokenServiceStub(channel).GetJwks(
                token_pb.GetJwksRequest(), timeout=args.timeout
            )
        return VerificationKeys.from_jwks(json.loads(response.jwks_json))
    return load_verification_keys(existing_state_dir(args.state_dir))


def _local_revocations(state_dir: Path, lineage: tuple[str, ...]) -> set[str]:
    """Revoked ids of ``lineage`` in a local state store (empty when there is none)."""
    if not (state_dir / "state.db").exists():
        return set()
    from sidecar.state.sqlite import SQLiteStore  # noqa: PLC0415

    store = SQLiteStore(state_dir / "state.db")
    try:
        revoked = store.revocation(lineage)
    finally:
        store.close()
    return {revoked.token_id} if revoked is not None else set()


REVOCATION_NOT_CHECKED = (
    "revocation not checked: --target and --jwks give keys only (ask the server with "
    "`proviso check`, or inspect with the server's --state-dir)"
)


def cmd_token_inspect(args: argparse.Namespace) -> int:
    """Decode a token, verify it (keys of --state-dir, --jwks FILE or the server at --target),
    and say why it would be refused, if it would; with --tool and --args, for that call.

    Revocations are read from --state-dir's store; with --target or --jwks they are not
    checked, and the verdict says so."""
    try:
        header, payload = unverified_claims(args.token)
        keys = _inspect_keys(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except NoStateDirError as exc:
        return _fail(str(exc))
    except grpc.RpcError as exc:
        return _rpc_failed(exc, args.target, "cannot get the keys to verify with: ")
    except (OSError, ValueError) as exc:
        return _fail(f"cannot get the keys to verify with: {exc}")
    report: dict[str, object] = {"header": header, "claims (unverified)": payload}
    now = time.time()
    local = not (args.target or args.jwks)
    verdict = "valid"
    if not local:
        checked = f"signature, lifetime and scope for {args.tool}" if args.tool else None
        verdict = f"valid {checked or 'signature and lifetime'}; {REVOCATION_NOT_CHECKED}"
    code = ""
    try:
        claims = verify(args.token, keys, audience=args.audience, issuer=args.issuer, now=now)
        report["expires_in_seconds"] = int(claims.expires_at - now)
        revoked = _local_revocations(Path(args.state_dir), claims.lineage) if local else set()
        if revoked:
            raise TokenRevokedError(f"{revoked.pop()} is revoked", token_id=claims.token_id)
        if args.tool:
            verify_call(
                args.token, keys, audience=args.audience, issuer=args.issuer, tool=args.tool,
                arguments=args.args or "{}", now=now, run_id=args.run_id or None,
            )  # fmt: skip
    except TokenError as exc:
        code, verdict = exc.code, f"refused: {exc.code}: {exc.message}"
    except ValueError as exc:
        return _fail(f"--args: {exc}", EXIT_USAGE)
    report["verdict"] = verdict
    report["revocation_checked"] = local
    if args.format == "json":
        print(json.dumps({**report, "refusal_code": code}, indent=2, default=str))
    else:
        print(json.dumps(header, indent=2))
        print(json.dumps(payload, indent=2))
        print(f"proviso: {verdict}", file=sys.stderr if code else sys.stdout)
    return EXIT_REFUSED if code else EXIT_OK


def _add_token_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="capability tokens", description="Tokens.")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    grant_help = (
        "TOOL[:ITEM,...]: a tool the token allows; ITEM is a pin ARG=VALUE or a constraint "
        "ARG<=N, ARG>=N (inclusive decimals) or 'ARG in A|B|C'; repeat for more tools"
    )

    issue = token_commands.add_parser(
        "issue", help="mint a token (as an issuer, or with the local key)",
        description=cmd_token_issue.__doc__,
    )  # fmt: skip
    issue.add_argument("--agent", required=True, metavar="ID")
    issue.add_argument(
        "--grant", required=True, action="append", metavar="TOOL[:ITEM,...]", help=grant_help
    )
    issue.add_argument(
        "--ttl", type=lifetime, default="15m", help="lifetime, capped by the role (default 15m)"
    )
    issue.add_argument("--run-id", default=None, metavar="ID", help="bind the token to a run")
    issue.add_argument("--issuer", default=config.DEFAULT_TOKEN_ISSUER, help=argparse.SUPPRESS)
    issue.add_argument("--audience", default=config.DEFAULT_AUDIENCE, help=argparse.SUPPRESS)
    _add_caller_options(issue)
    issue.set_defaults(handler=cmd_token_issue)

    attenuate = token_commands.add_parser(
        "attenuate", help="derive a narrower child token", description=cmd_token_attenuate.__doc__
    )
    attenuate.add_argument("--token", required=True, metavar="PARENT")
    attenuate.add_argument(
        "--grant", required=True, action="append", metavar="TOOL[:ITEM,...]", help=grant_help
    )
    attenuate.add_argument(
        "--ttl", type=lifetime, default=None, help="lifetime (default: until the parent expires)"
    )
    attenuate.add_argument("--run-id", default=None, metavar="ID")
    attenuate.add_argument(
        "--target", type=cli_identity.target, default=DEFAULT_TARGET, metavar="HOST:PORT"
    )
    attenuate.add_argument("--timeout", type=cli_identity.timeout, default=5.0, metavar="SECONDS")
    attenuate.add_argument("--format", choices=("text", "json"), default="text")
    attenuate.set_defaults(handler=cmd_token_attenuate)

    revoke = token_commands.add_parser(
        "revoke", help="revoke a token and its descendants", description=cmd_token_revoke.__doc__
    )
    revoke.add_argument("--token-id", metavar="JTI")
    revoke.add_argument("--token", metavar="TOKEN", help="the token itself (its jti is used)")
    revoke.add_argument("--reason", required=True, metavar="TEXT")
    _add_caller_options(revoke)
    revoke.set_defaults(handler=cmd_token_revoke)

    inspect = token_commands.add_parser(
        "inspect", help="decode and verify a token, saying why it would be refused",
        description=cmd_token_inspect.__doc__,
    )  # fmt: skip
    inspect.add_argument("--token", required=True, metavar="TOKEN")
    inspect.add_argument("--tool", metavar="NAME", help="check the scope for this tool")
    inspect.add_argument("--args", metavar="JSON", help="the call's arguments, with --tool")
    inspect.add_argument("--run-id", metavar="ID")
    inspect.add_argument("--jwks", metavar="FILE", help="verify with this JWKS")
    inspect.add_argument(
        "--target",
        type=cli_identity.target,
        metavar="HOST:PORT",
        help="verify with a server's JWKS",
    )
    inspect.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
    inspect.add_argument("--issuer", default=config.DEFAULT_TOKEN_ISSUER)
    inspect.add_argument("--audience", default=config.DEFAULT_AUDIENCE)
    inspect.add_argument("--timeout", type=cli_identity.timeout, default=5.0, metavar="SECONDS")
    inspect.add_argument("--format", choices=("text", "json"), default="text")
    inspect.set_defaults(handler=cmd_token_inspect)


# ---------------------------------------------------------------- keys


def _retention(args: argparse.Namespace) -> float:
    from sidecar.app import key_retention_seconds  # noqa: PLC0415

    try:
        return key_retention_seconds(load_policy(Path(args.policies)))
    except PolicyLoadError as exc:
        raise UsageError(f"policy bundle {args.policies} has errors: {exc}") from None


def _print_keys(state_dir: Path, retention: float, fmt: str) -> None:
    now = time.time()
    rows = [
        {
            "kid": status.kid,
            "status": "active"
            if status.active
            else ("verifying" if status.trusted(now) else "expired"),
            "retired_at": status.retired_at,
            "trusted_until": status.trusted_until,
        }
        for status in key_statuses(state_dir, retention)
    ]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'KID':<45} {'STATUS':<10} TRUSTED UNTIL")
    for row in rows:
        until = row["trusted_until"]
        shown = "-"
        if isinstance(until, float):
            shown = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
        print(f"{row['kid']:<45} {row['status']:<10} {shown}")


def cmd_keys(args: argparse.Namespace) -> int:
    """List the signing keys in --state-dir, or rotate them: a new key signs from now on; the
    old one verifies until every token it signed has expired (the policy's longest TTL).
    list only reads: it needs an existing --state-dir; rotate creates one on first use."""
    state_dir = Path(args.state_dir)
    try:
        if args.keys_command == "list":
            existing_state_dir(args.state_dir)
        retention = _retention(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except NoStateDirError as exc:
        return _fail(str(exc))
    if args.keys_command == "rotate":
        ring, removed = rotate(state_dir, time.time(), retention)
        print(f"proviso: new active key {ring.active.kid}", file=sys.stderr)
        for kid in removed:
            print(f"proviso: deleted expired key {kid}", file=sys.stderr)
    _print_keys(state_dir, retention, args.format)
    return EXIT_OK


def _add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="token-signing keys", description=cmd_keys.__doc__)
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    for name, text in (
        ("list", "the keys, which one signs, and until when each verifies"),
        ("rotate", "make a new active key; a running server picks it up without a restart"),
    ):
        sub = keys_commands.add_parser(name, help=text, description=text)
        sub.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
        sub.add_argument(
            "--policies", default="policies", metavar="DIR", help="for the longest token TTL"
        )
        sub.add_argument("--format", choices=("text", "json"), default="text")
        sub.set_defaults(handler=cmd_keys)


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Ask a running sidecar for one decision and print it: JSON, or ``--format text``."""
    from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import authorization_service_pb2_grpc as authz_grpc  # noqa: PLC0415

    metadata: dict[str, str] = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            return _fail(f"--metadata {item!r}: expected KEY=VALUE", EXIT_USAGE)
        metadata[key] = value
    request = authz_pb.CheckRequest(
        token=args.token,
        tool=args.tool,
        arguments_json=args.args,
        context_json=args.context,
        run_id=args.run_id,
        step_id=args.step_id,
        idempotency_key=args.idempotency_key,
        approval_id=args.approval_id,
        dry_run=args.dry_run,
        run_metadata=metadata,
    )
    response = _call(args, authz_grpc.AuthorizationServiceStub, "Check", request)
    if response is None:
        return EXIT_REFUSED
    if args.format == "json":
        answer = json_format.MessageToDict(response, preserving_proto_field_name=True)
        print(json.dumps(answer, indent=2))
    else:
        print(_decision_text(response, dry_run=args.dry_run))
    return EXIT_OK if response.decision == authz_pb.DECISION_ALLOW else EXIT_REFUSED


def _decision_text(response: Any, *, dry_run: bool = False) -> str:
    """A CheckResponse for people: the decision, then what to do about it, then why."""
    from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb  # noqa: PLC0415

    decision = authz_pb.Decision.Name(response.decision).removeprefix("DECISION_")
    rows = [("decision", decision), ("tier", response.matched_tier or "-")]
    if dry_run:
        rows.append(("dry run", "evaluated only: nothing was spent, recorded or used"))
    if response.decision == authz_pb.DECISION_NEEDS_APPROVAL and response.HasField(
        "approval_requirement"
    ):  # an ALLOW by an approval carries the requirement too: it needs nothing more
        needed = response.approval_requirement
        roles = ", ".join(needed.approver_roles)
        rows.append(("needs", f"{needed.approvals_required} approval(s) from {roles}"))
    if response.approval_id:
        rows.append(("approval", response.approval_id))
    if response.HasField("retry_after"):
        rows.append(("retry in", f"{response.retry_after.ToTimedelta().total_seconds():g}s"))
    if response.replayed:
        rows.append(("replayed", "the recorded decision of an earlier call with this key"))
    rows += [("policy", response.policy_version), ("id", response.decision_id)]
    lines = [f"{name:<9} {value}" for name, value in rows]
    for reason in response.reasons:
        code = authz_pb.ReasonCode.Name(reason.code).removeprefix("REASON_CODE_")
        where = f" at {reason.field}" if reason.field else ""
        # The message may quote the agent's argument keys: shown() keeps escapes inert.
        lines.append(f"  {code}: {shown(reason.message)}{shown(where)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- callers and kill switches


def _kill_request(args: argparse.Namespace, engaged: bool) -> object:
    from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb  # noqa: PLC0415

    chosen = [x for x in (args.all, args.tool, args.agent) if x]
    if len(chosen) != 1:
        raise UsageError("name exactly one of --all, --tool NAME, --agent ID")
    if args.all:
        scope, target = admin_pb.KILL_SWITCH_SCOPE_GLOBAL, ""
    elif args.tool:
        scope, target = admin_pb.KILL_SWITCH_SCOPE_TOOL, args.tool
    else:
        scope, target = admin_pb.KILL_SWITCH_SCOPE_AGENT, args.agent
    if engaged and not args.reason:
        raise UsageError("--reason is required to engage a kill switch")
    return admin_pb.SetKillSwitchRequest(
        scope=scope, target=target, engaged=engaged, reason=args.reason or ""
    )


def _print_switches(switches: Sequence[object], fmt: str) -> None:
    rows = [json_format.MessageToDict(s, preserving_proto_field_name=True) for s in switches]  # type: ignore[arg-type]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no kill switches engaged")
        return
    print(f"{'SCOPE':<8} {'TARGET':<36} {'SOURCE':<7} {'BY':<24} REASON")
    for row in rows:
        scope = str(row.get("scope", "")).removeprefix("KILL_SWITCH_SCOPE_").lower()
        print(
            f"{scope:<8} {row.get('target', '-') or '-':<36} {row.get('source', ''):<7} "
            f"{row.get('engaged_by', ''):<24} {row.get('reason', '')}"
        )


def cmd_kill(args: argparse.Namespace) -> int:
    """Engage, release or list kill switches on a running sidecar (admins only)."""
    from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc  # noqa: PLC0415

    try:
        metadata = cli_identity.metadata(args)
        request = (
            None
            if args.kill_command == "list"
            else _kill_request(args, engaged=args.kill_command == "engage")
        )
    except (UsageError, cli_identity.IdentityOptionError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    with grpc.insecure_channel(args.target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        try:
            if request is None:
                listed = stub.ListKillSwitches(
                    admin_pb.ListKillSwitchesRequest(), metadata=metadata, timeout=args.timeout
                )
                _print_switches(list(listed.kill_switches), args.format)
                return EXIT_OK
            response = stub.SetKillSwitch(request, metadata=metadata, timeout=args.timeout)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            return _rpc_failed(exc, args.target)
        still = (
            [] if response.engaged else _still_stopping(stub, response.kill_switch, metadata, args)
        )
    if args.format == "json" or response.engaged:
        _print_switches([response.kill_switch], args.format)
    else:
        print(f"released: {_switch_name(response.kill_switch)}")
    if args.format == "text":
        print("engaged" if response.engaged else "released", file=sys.stderr)
    for switch in still:
        how = "change the policy" if switch.source == "policy" else "release it too"
        print(
            f"proviso: warning: {_switch_name(switch)} ({switch.source}) still stops these "
            f"calls: {how}",
            file=sys.stderr,
        )
    return EXIT_OK


def _switch_name(switch: Any) -> str:
    from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb  # noqa: PLC0415

    scope = admin_pb.KillSwitchScope.Name(switch.scope).removeprefix("KILL_SWITCH_SCOPE_").lower()
    return scope if scope == "global" else f"{scope} {switch.target}"


def _still_stopping(
    stub: Any, released: Any, metadata: Sequence[tuple[str, str]], args: argparse.Namespace
) -> list[Any]:
    """The switches that still stop what ``released`` stopped: the global one, and one of the
    policy (released only by changing the policy) on the same target. Told as a warning, so
    that "released" is not read as "calls flow again"; [] when they cannot be listed."""
    from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb  # noqa: PLC0415

    try:
        listed = stub.ListKillSwitches(
            admin_pb.ListKillSwitchesRequest(), metadata=metadata, timeout=args.timeout
        )
    except grpc.RpcError:
        return []
    return [
        switch
        for switch in listed.kill_switches
        if switch.scope == admin_pb.KILL_SWITCH_SCOPE_GLOBAL
        or (switch.scope, switch.target) == (released.scope, released.target)
    ]


def _digest_hex(digest: str) -> str:
    """An arguments digest as lower-case hex, with or without its ``sha256:`` prefix."""
    return digest.strip().lower().removeprefix("sha256:")


def _approval_row(approval: dict[str, Any]) -> str:
    verdicts: list[dict[str, Any]] = approval.get("verdicts", [])
    approved = sum(1 for verdict in verdicts if verdict.get("approve"))
    state = str(approval.get("state", "")).removeprefix("APPROVAL_STATE_").lower()
    return (
        f"{approval.get('approval_id', ''):<32} {state:<9} {approval.get('agent', ''):<34} "
        f"{approval.get('tool', ''):<16} {approval.get('tier', ''):<11} "
        f"{approved}/{approval.get('approvals_required', 0)}"
    )


def _caller_subject(args: argparse.Namespace) -> str:
    """Who the identity options name: --as SUBJECT, or the sub of --identity-token (read
    without verifying: for display only); "" if neither says."""
    if args.as_subject:
        return str(args.as_subject)
    try:
        return str(unverified_claims(args.identity_token or "")[1].get("sub", ""))
    except UsageError:
        return ""


def _earlier_verdict(approval: Any, subject: str) -> str:
    """The caller's verdict already on ``approval``, as words ("" if it does not show)."""
    for verdict in approval.verdicts:
        if subject and verdict.approver == subject:
            given = "approved" if verdict.approve else "rejected"
            when = verdict.time.ToDatetime().isoformat(timespec="seconds") + "Z"
            comment = f": {verdict.comment!r}" if verdict.comment else ""
            return f" ({subject} {given} it at {when}{comment})"
    return ""


def cmd_approvals(args: argparse.Namespace) -> int:
    """List, show, approve or reject approval requests on a running sidecar."""
    from sidecar._proto.proviso.v1 import approval_service_pb2 as ap_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import approval_service_pb2_grpc as ap_grpc  # noqa: PLC0415

    try:
        metadata = cli_identity.metadata(args)
    except cli_identity.IdentityOptionError as exc:
        return _fail(str(exc), EXIT_USAGE)
    next_page_token = ""
    counted = True
    with grpc.insecure_channel(args.target) as channel:
        stub = ap_grpc.ApprovalServiceStub(channel)
        try:
            if args.approvals_command == "list":
                state = ap_pb.ApprovalState.Value(f"APPROVAL_STATE_{args.state.upper()}")
                response = stub.ListApprovals(
                    ap_pb.ListApprovalsRequest(
                        state=state,
                        agent=args.agent,
                        tool=args.tool,
                        page_size=args.page_size,
                        page_token=args.page_token,
                    ),
                    metadata=metadata,
                    timeout=args.timeout,
                )
                found = list(response.approvals)
                next_page_token = response.next_page_token
            elif args.approvals_command == "show":
                found = [
                    stub.GetApproval(
                        ap_pb.GetApprovalRequest(approval_id=args.approval_id),
                        metadata=metadata,
                        timeout=args.timeout,
                    ).approval
                ]
            else:
                if args.args_digest:
                    # The id names one call for good, so checking it first leaves no gap.
                    named = stub.GetApproval(
                        ap_pb.GetApprovalRequest(approval_id=args.approval_id),
                        metadata=metadata,
                        timeout=args.timeout,
                    ).approval
                    if _digest_hex(named.args_digest) != _digest_hex(args.args_digest):
                        return _fail(
                            f"{args.approval_id} is not the call you named: its arguments "
                            f"digest is {named.args_digest}, not {args.args_digest}; nothing "
                            f"was judged (proviso approvals show {args.approval_id})"
                        )
                judge = stub.ApproveApproval if args.approvals_command == "approve" else None
                if judge is not None:
                    changed = judge(
                        ap_pb.ApproveApprovalRequest(
                            approval_id=args.approval_id, comment=args.comment
                        ),
                        metadata=metadata,
                        timeout=args.timeout,
                    )
                else:
                    changed = stub.RejectApproval(  # type: ignore[assignment]
                        ap_pb.RejectApprovalRequest(
                            approval_id=args.approval_id, comment=args.comment
                        ),
                        metadata=metadata,
                        timeout=args.timeout,
                    )
                found = [changed.approval]
                counted = changed.counted
                if not counted:
                    earlier = _earlier_verdict(changed.approval, _caller_subject(args))
                    print(f"proviso: you had already given a verdict{earlier}; it counts once",
                          file=sys.stderr)  # fmt: skip
        except grpc.RpcError as exc:
            return _rpc_failed(exc, args.target)
    rows = [json_format.MessageToDict(a, preserving_proto_field_name=True) for a in found]
    if args.format == "json" or args.approvals_command == "show":
        # The list stays a bare array (scripts read it so); the next page is on stderr.
        print(json.dumps(rows if args.approvals_command == "list" else rows[0], indent=2))
    elif not rows:
        print("no approval requests")
    else:
        print(f"{'ID':<32} {'STATE':<9} {'AGENT':<34} {'TOOL':<16} {'TIER':<11} APPROVALS")
        for row in rows:
            print(_approval_row(row))
        if args.approvals_command in ("approve", "reject"):
            # What was judged, exactly: the row names only the agent and the tool.
            print(f"run:       {rows[0].get('run_id', '') or '(none)'}")
            # The canonical text as stored (exact numbers), anything not ASCII escaped so an
            # invisible or look-alike character shows.
            shown = found[0].arguments_json.encode("ascii", "backslashreplace").decode("ascii")
            print(f"arguments: {shown}")
    if next_page_token:
        print(f"proviso: more requests: --page-token {next_page_token}", file=sys.stderr)
    return EXIT_OK if counted else EXIT_REFUSED


def _add_approvals_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    approvals = commands.add_parser(
        "approvals", help="approval requests (approvers)", description=cmd_approvals.__doc__
    )
    sub = approvals.add_subparsers(dest="approvals_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="approval requests, newest first")
    listing.add_argument(
        "--state",
        default="pending",
        choices=("pending", "approved", "rejected", "expired", "consumed", "unspecified"),
        help="only requests in this state (unspecified: all; default pending)",
    )
    listing.add_argument("--agent", default="", metavar="ID")
    listing.add_argument("--tool", default="", metavar="NAME")
    listing.add_argument(
        "--page-size", type=int, default=50, metavar="N", help="at most N (default 50, max 500)"
    )
    listing.add_argument(
        "--page-token",
        default="",
        metavar="TOKEN",
        help="the next page: the token the previous page printed on stderr",
    )
    show = sub.add_parser("show", help="one request with its arguments and verdicts")
    show.add_argument("approval_id", metavar="ID")
    for name in ("approve", "reject"):
        judge = sub.add_parser(name, help=f"{name} a request (as an eligible approver)")
        judge.add_argument("approval_id", metavar="ID")
        judge.add_argument("--comment", default="", metavar="TEXT")
        judge.add_argument(
            "--args-digest",
            default="",
            metavar="SHA",
            help="judge only if the request's arguments have this digest (as 'show' prints "
            "it; 'sha256:' and case optional): a mistyped id then judges nothing (exit 1). "
            "It names the arguments, not the agent or run: read those in 'show'",
        )
    for command in (listing, show, *(sub.choices[n] for n in ("approve", "reject"))):
        _add_caller_options(command)
        command.set_defaults(handler=cmd_approvals)


def _add_caller_options(command: argparse.ArgumentParser) -> None:
    """--target and the caller identity, the same on every command that talks to a server."""
    cli_identity.add_arguments(command)
    command.add_argument("--format", choices=("text", "json"), default="text")


# ---------------------------------------------------------------- policy show / reload


def _admin_call(args: argparse.Namespace, method: str) -> int:
    """Call one AdminService policy method and print the result; exit 1 if it failed."""
    from google.rpc import error_details_pb2  # noqa: PLC0415
    from grpc_status import rpc_status  # noqa: PLC0415

    from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb  # noqa: PLC0415
    from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc  # noqa: PLC0415

    try:
        metadata = cli_identity.metadata(args)
    except cli_identity.IdentityOptionError as exc:
        return _fail(str(exc), EXIT_USAGE)
    with grpc.insecure_channel(args.target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        try:
            if method == "reload":
                response: Any = stub.ReloadPolicy(
                    admin_pb.ReloadPolicyRequest(), metadata=metadata, timeout=args.timeout
                )
            else:
                response = stub.GetPolicy(
                    admin_pb.GetPolicyRequest(), metadata=metadata, timeout=args.timeout
                )
        except grpc.RpcError as exc:
            status = rpc_status.from_call(exc)
            violations = []
            for detail in status.details if status is not None else ():
                failure = error_details_pb2.PreconditionFailure()
                if detail.Unpack(failure):
                    violations.extend(failure.violations)
            for violation in violations:
                print(
                    f"{violation.subject}: error {violation.type}: {violation.description}",
                    file=sys.stderr,
                )
            if args.format == "json":
                # A script reading stdout learns of the refusal, and why, without parsing stderr.
                refusal = {
                    "code": exc.code().name,
                    "message": str(exc.details() or ""),
                    "violations": [
                        json_format.MessageToDict(v, preserving_proto_field_name=True)
                        for v in violations
                    ],
                }
                print(json.dumps({"error": refusal}, indent=2))
            return _rpc_failed(exc, args.target)
    if args.format == "json":
        print(
            json.dumps(
                json_format.MessageToDict(response, preserving_proto_field_name=True), indent=2
            )
        )
        return EXIT_OK
    if method == "reload":
        state = "reloaded" if response.changed else "unchanged"
        print(f"{state}: version {response.policy.version} {response.policy.label}".rstrip())
        return EXIT_OK
    print(_policy_table(response.policy))
    if response.HasField("shadow_policy"):
        print("\nshadow (evaluated beside the active policy; never decides):")
        print(_policy_table(response.shadow_policy))
    return EXIT_OK


def _policy_table(info: Any) -> str:
    loaded = info.load_time.ToDatetime().isoformat(timespec="seconds") + "Z"
    rows = [
        ("version", info.version),
        ("label", info.label or "-"),
        ("loaded", loaded),
        ("files", ", ".join(info.source_files)),
        ("tools", ", ".join(info.tools)),
    ]
    return "\n".join(f"{name:<8} {value}" for name, value in rows)


def cmd_policy_show(args: argparse.Namespace) -> int:
    """Show the policy a running server has in force (and its shadow): admins only."""
    return _admin_call(args, "show")


def cmd_policy_reload(args: argparse.Namespace) -> int:
    """Make a running server reload its policy directory; print the errors if it refuses."""
    return _admin_call(args, "reload")


# ---------------------------------------------------------------- audit


def _audit_path(given: str | None, state_dir: str) -> Path:
    """The log to read: as given, or the state directory's default location."""
    return Path(given) if given else Path(state_dir) / "audit"


def _verification_keys(args: argparse.Namespace) -> VerificationKeys:
    """Checkpoint keys from --jwks, else from the state directory's key ring.

    Raises:
        UsageError: neither gives a key.
    """
    try:
        if args.jwks:
            return VerificationKeys.from_jwks(json.loads(Path(args.jwks).read_text()))
        return load_verification_keys(Path(args.state_dir))
    except (OSError, ValueError, KeyFormatError) as exc:
        raise UsageError(f"no keys to verify checkpoints with: {exc}") from None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Prove the audit log's hash chain and checkpoint signatures; exit 1 at the first break.

    A directory may hold several chains (``serve --workers N`` writes one per worker): each is
    verified on its own, and all must verify. Their signed checkpoints name every chain of the
    same serve, so a chain whose files are all gone is reported too.
    """
    try:
        keys = _verification_keys(args)
        path = _audit_path(args.path, args.state_dir)
        chains = logs(path)
    except (UsageError, AuditLogNotFoundError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    present = _present_logs(path, chains)
    reports = [_verify_chain(files, keys, args, present) for files in chains]
    ok = all(report["ok"] for report in reports)
    if args.format == "json":
        print(
            json.dumps(reports[0] if len(reports) == 1 else {"ok": ok, "logs": reports}, indent=2)
        )
    return EXIT_OK if ok else EXIT_REFUSED


def _verify_chain(
    files: list[Path],
    keys: VerificationKeys,
    args: argparse.Namespace,
    present: set[str] | None,
) -> dict[str, Any]:
    """Verify one chain; print its summary unless the output is JSON.

    ``present`` is the logs found beside it (by name), None when it was named alone: a
    sibling its checkpoints name that is not among them is missing.
    """
    result = verify_log(files, keys)
    state, broken = result.state, result.broken
    unsealed = state.unsealed
    missing = _missing_logs(state, present)
    report = {
        "ok": broken is None and not (args.require_sealed and unsealed) and not missing,
        "files": [str(path) for path in files],
        "records": state.records,
        "checkpoints": state.checkpoints,
        "first_seq": state.first_seq or 0,
        "last_seq": state.seq,
        "sealed_through": state.sealed_seq,
        "unsealed": unsealed,
        "kids": sorted(state.kids),
        "missing_logs": missing,
        "break": None
        if broken is None
        else {
            "file": broken.file,
            "line": broken.line,
            "seq": broken.seq,
            "problem": broken.problem.value,
            "message": broken.message,
        },
    }
    if args.format != "json":
        span = f"seq {state.first_seq}-{state.seq}" if state.seq else "no records"
        summary = (
            f"{span}, {state.records} records, {state.checkpoints} signed checkpoints "
            f"in {len(files)} file(s)"
        )
        if broken is not None:
            print(f"BROKEN at {broken}")
            print(f"verified before it: {summary}")
        else:
            verdict = "INCOMPLETE" if missing else "ok"
            print(f"{verdict}: {summary}" + (f" ({files[-1].name})" if len(files) else ""))
        for name in missing:
            print(
                f"MISSING: {name}, a chain that signed checkpoints of {files[-1].name} name, is "
                f"not in {files[-1].parent} (deleted, or moved elsewhere)"
            )
        if unsealed and broken is None:
            print(
                f"{'error' if args.require_sealed else 'note'}: the last {unsealed} record(s) "
                f"(seq {state.sealed_seq + 1}-{state.seq}) follow the last checkpoint: chained "
                "but not signed yet, so a cut there would not show (a live or crashed sidecar's "
                "tail; a cleanly stopped one ends with a checkpoint)"
            )
    return report


def _missing_logs(state: ChainState, present: set[str] | None) -> list[str]:
    """The chains a chain's signed checkpoints name that are not among ``present`` (the logs
    found beside it, by name; None when it was named alone: nothing to compare with)."""
    if present is None:
        return []
    return sorted(name for name in state.logs if log_stem(Path(name)) not in present)


def _present_logs(path: Path, chains: list[list[Path]]) -> set[str] | None:
    """Only a directory is all of a serve's chains; one file named alone is checked alone."""
    return {log_stem(files[-1]) for files in chains} if path.is_dir() else None


def _unverified(
    path: Path, chains: list[list[Path]], state_dir: str, *, strict: bool
) -> str | None:
    """Why the log cannot be trusted as it is, or None: no keys in ``state_dir`` to verify it
    with, a chain that breaks, a chain gone that the others' checkpoints name, and (``strict``)
    records that no signed checkpoint covers yet, which anyone able to write the file could
    have written (a running sidecar signs its newest within seconds)."""
    try:
        keys = load_verification_keys(Path(state_dir))
    except (OSError, ValueError, KeyFormatError):
        return f"no keys in {state_dir} to verify the audit log with (--state-dir)"
    present = _present_logs(path, chains)
    for files in chains:
        result = verify_log(files, keys)
        if result.broken is not None:
            return f"the audit log does not verify, BROKEN at {result.broken}"
        missing = _missing_logs(result.state, present)
        if missing:
            return f"the audit log is INCOMPLETE: chain(s) {', '.join(missing)} are missing"
        if strict and result.state.unsealed:
            return (
                f"{result.state.unsealed} record(s) of {log_stem(files[-1])} follow its last "
                "signed checkpoint: nothing vouches for them yet"
            )
    return None


def _trust_log(path: Path, chains: list[list[Path]], args: argparse.Namespace) -> bool:
    """``trace`` and ``replay`` read the log as it is, after verifying it with the keys of
    ``--state-dir``. With ``--require-verified`` (for scripts) a log that does not verify, or
    whose records are not all under a signed checkpoint, is refused: no output, exit 1.
    Otherwise a log that does not verify is read with a warning on stderr, so that an edited
    log is not taken at its word."""
    problem = _unverified(path, chains, args.state_dir, strict=args.require_verified)
    if problem is None:
        return True
    if args.require_verified:
        _fail(f"{problem}: refused (--require-verified)")
        return False
    print(
        f"proviso: warning: {problem}: what follows may not be what was recorded "
        "(proviso audit verify)",
        file=sys.stderr,
    )
    return True


def cmd_audit_trace(args: argparse.Namespace) -> int:
    """Rebuild one run from the audit log: every Check in order, with why it was decided."""
    from sidecar.audit import trace  # noqa: PLC0415 - only this command needs it

    path = _audit_path(args.audit, args.state_dir)
    try:
        if not _trust_log(path, logs(path), args):
            return EXIT_REFUSED
        found = trace.load_trace(path, args.run_id)
    except AuditLogNotFoundError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if found is None:
        return _fail(f"no Check of run '{args.run_id}' in the audit log")
    if args.format == "json":
        print(json.dumps(trace.to_json(found), indent=2, ensure_ascii=False))
    else:
        print(trace.to_table(found))
    return EXIT_OK


# ---------------------------------------------------------------- replay


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-decide recorded Checks under another policy bundle and print what would change."""
    from sidecar.audit import replay  # noqa: PLC0415 - only this command needs it

    audit_path = _audit_path(args.audit, args.state_dir)
    try:
        chains = logs(audit_path)
    except AuditLogNotFoundError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        policy = load_policy(Path(args.policies))
    except PolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"policy bundle {args.policies} has errors")
    if not _trust_log(audit_path, chains, args):
        return EXIT_REFUSED
    recorded = (record for files in chains for record in records(files))
    report = replay.replay(recorded, policy, examples=args.examples, run_id=args.run_id)
    if args.format == "json":
        print(json.dumps(replay.to_json(report), indent=2, ensure_ascii=False))
    else:
        print(replay.to_table(report))
    return EXIT_REFUSED if args.fail_on_change and report.changed else EXIT_OK


# ---------------------------------------------------------------- parser


def _add_policy_commands(commands: Any) -> None:
    """``proviso policy show|reload``: they talk to a running server as an admin."""
    policy = commands.add_parser(
        "policy", help="the policy of a running server", description="The server's policy."
    )
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    for name, handler, summary in (
        ("show", cmd_policy_show, "show the version in force"),
        ("reload", cmd_policy_reload, "reload the policy directory now"),
    ):
        sub = policy_commands.add_parser(name, help=summary, description=handler.__doc__)
        cli_identity.add_arguments(sub)
        sub.add_argument("--format", choices=("text", "json"), default="text")
        sub.set_defaults(handler=handler)


def _add_kill_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kill = commands.add_parser("kill", help="kill switches (admins)", description=cmd_kill.__doc__)
    kill_commands = kill.add_subparsers(dest="kill_command", required=True, metavar="COMMAND")
    for name, text in (
        ("engage", "stop calls now: everything (--all), one tool, or one agent"),
        ("release", "let calls through again"),
        ("list", "the engaged switches, from the API and the policy"),
    ):
        sub = kill_commands.add_parser(name, help=text, description=text)
        if name != "list":
            sub.add_argument("--all", action="store_true", help="the global switch")
            sub.add_argument("--tool", metavar="NAME")
            sub.add_argument("--agent", metavar="ID")
            sub.add_argument(
                "--reason", metavar="TEXT", help="why (required to engage; at most 1024 characters)"
            )
        _add_caller_options(sub)
        sub.set_defaults(handler=cmd_kill)


def _add_test_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = commands.add_parser(
        "test", help="run a bundle's policy unit tests", description=cmd_test.__doc__
    )
    test.add_argument("directory", metavar="DIR", help="the bundle, with its *_test.yaml files")
    test.add_argument("--format", choices=("text", "json"), default="text")
    test.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")
    test.set_defaults(handler=cmd_test)


def _add_serve_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``serve``: run the sidecar."""
    serve = commands.add_parser("serve", help="run the sidecar", description=cmd_serve.__doc__)
    serve.add_argument("--policies", metavar="DIR", help="policy bundle (default: policies)")
    serve.add_argument("--listen", metavar="HOST:PORT", help=f"gRPC (default {DEFAULT_TARGET})")
    serve.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="HTTP /metrics (default 127.0.0.1:9464)"
    )
    serve.add_argument("--state-dir", metavar="DIR", help="keys and state (default ./.proviso)")
    serve.add_argument("--idp-jwks", metavar="FILE", help="the IdP's JWKS; disables dev mode")
    serve.add_argument("--idp-issuer", metavar="ISS", help="the IdP's issuer (iss)")
    serve.add_argument(
        "--idp-ca-file",
        metavar="PEM",
        help="CA certificates to trust for an https --idp-jwks URL (a private CA; "
        "default: the system's)",
    )
    serve.add_argument(
        "--token-leeway",
        metavar="SECONDS",
        help="clock skew tolerated on capability tokens' nbf and exp: whole seconds from 0 to "
        f"{config.MAX_LEEWAY_SECONDS} (default {config.DEFAULT_LEEWAY_SECONDS})",
    )
    serve.add_argument(
        "--audit-group-commit",
        metavar="MS",
        help="under load, how long a Check may wait for the Checks arriving with it, to be "
        "decided with them in one state transaction and share one audit fsync: 0 (never wait) "
        f"to {config.MAX_AUDIT_GROUP_COMMIT_MS} ms (default "
        f"{config.DEFAULT_AUDIT_GROUP_COMMIT_MS}); it stops waiting when the next Check is "
        "0.3 ms late",
    )
    serve.add_argument(
        "--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING (WARN), ERROR, CRITICAL"
    )
    serve.add_argument(
        "--shadow-policies",
        metavar="DIR",
        help="a candidate bundle evaluated beside the active one on every Check; it never "
        "decides, disagreements are counted and audited",
    )
    serve.add_argument(
        "--watch-interval",
        metavar="SECONDS",
        help="poll the policy directories for changes this often (default 1; 0 = off); "
        "SIGHUP and AdminService.ReloadPolicy reload too",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="server processes sharing the port (SO_REUSEPORT), each with its own audit chain "
        "and /metrics port (default: the number of CPUs; 1 = this process alone)",
    )
    serve.add_argument(
        "--max-in-flight",
        metavar="N",
        help="Checks decided at once per process; more are refused at once with "
        f"RESOURCE_EXHAUSTED (default {config.DEFAULT_MAX_IN_FLIGHT})",
    )
    serve.set_defaults(handler=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proviso", description="Policy-as-code authorization sidecar for AI agents."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve_command(commands)

    lint = commands.add_parser("lint", help="check a policy bundle", description=cmd_lint.__doc__)
    lint.add_argument("directory", metavar="DIR")
    lint.add_argument("--format", choices=("text", "json"), default="text")
    lint.set_defaults(handler=cmd_lint)

    _add_test_command(commands)
    _add_policy_commands(commands)
    _add_token_commands(commands)
    _add_keys_commands(commands)

    check = commands.add_parser(
        "check", help="ask a running sidecar for a decision", description=cmd_check.__doc__
    )
    check.add_argument("--token", required=True, metavar="T")
    check.add_argument("--tool", required=True, metavar="NAME")
    check.add_argument("--args", required=True, metavar="JSON", help="the arguments object")
    check.add_argument("--context", default="", metavar="JSON")
    check.add_argument("--run-id", default="")
    check.add_argument("--step-id", default="")
    check.add_argument("--idempotency-key", default="")
    check.add_argument("--approval-id", default="")
    check.add_argument("--dry-run", action="store_true")
    check.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument(
        "--target", type=cli_identity.target, default=DEFAULT_TARGET, metavar="HOST:PORT"
    )
    check.add_argument("--timeout", type=cli_identity.timeout, default=5.0, metavar="SECONDS")
    check.add_argument(
        "--format", choices=("json", "text"), default="json", help="json (default) or text"
    )
    check.set_defaults(handler=cmd_check)

    _add_kill_commands(commands)
    _add_approvals_commands(commands)
    _add_audit_commands(commands)
    return parser


def _add_require_verified(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require-verified",
        action="store_true",
        help="refuse (exit 1, no output) a log that does not verify with the keys of "
        "--state-dir, lacks a worker's chain, or has records no signed checkpoint covers yet, "
        "instead of reading it with a warning",
    )


def _add_audit_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``audit verify``, ``audit trace`` and ``replay``."""
    audit = commands.add_parser("audit", help="the audit log", description="The audit log.")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_commands.add_parser(
        "verify", help="prove the hash chain and signatures", description=cmd_audit_verify.__doc__
    )
    verify.add_argument(
        "path", nargs="?", metavar="PATH",
        help="the log's active file or its directory (default: STATE_DIR/audit)",
    )  # fmt: skip
    verify.add_argument(
        "--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR",
        help="the sidecar's state directory: its key ring verifies the checkpoints",
    )  # fmt: skip
    verify.add_argument("--jwks", metavar="FILE", help="verify checkpoints with these keys instead")
    verify.add_argument(
        "--require-sealed", action="store_true",
        help="fail if records follow the last checkpoint (for the log of a stopped sidecar)",
    )  # fmt: skip
    verify.add_argument("--format", choices=("text", "json"), default="text")
    verify.set_defaults(handler=cmd_audit_verify)

    trace = audit_commands.add_parser(
        "trace", help="rebuild one run from the log", description=cmd_audit_trace.__doc__
    )
    trace.add_argument("run_id", type=nonempty_run_id, metavar="RUN_ID")
    trace.add_argument("--audit", metavar="PATH", help="the log (default: STATE_DIR/audit)")
    trace.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
    trace.add_argument("--format", choices=("table", "json"), default="table")
    _add_require_verified(trace)
    trace.set_defaults(handler=cmd_audit_trace)

    replay = commands.add_parser(
        "replay", help="re-decide recorded checks under another policy",
        description=cmd_replay.__doc__,
    )  # fmt: skip
    replay.add_argument("--audit", metavar="PATH", help="the log (default: STATE_DIR/audit)")
    replay.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
    replay.add_argument("--policies", required=True, metavar="DIR", help="the candidate bundle")
    replay.add_argument("--run-id", type=nonempty_run_id, default=None, metavar="ID",
                        help="replay only this run")  # fmt: skip
    replay.add_argument("--examples", type=count, default=5, metavar="N",
                        help="changed checks to show per kind of change (default 5)")  # fmt: skip
    replay.add_argument("--fail-on-change", action="store_true",
                        help="exit 1 if any decision or tier would change (for CI)")  # fmt: skip
    replay.add_argument("--format", choices=("table", "json"), default="table")
    _add_require_verified(replay)
    replay.set_defaults(handler=cmd_replay)


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""What a shell reports for a command stopped by SIGPIPE (``proviso ... | head -1``)."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # --help: its text may still be buffered
            raise
        result: int = args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped reading: stop quietly, as the Python docs recommend (signal
        # module, "Note on SIGPIPE"). stdout goes to devnull so the flush at exit cannot
        # fail again and print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return result


if __name__ == "__main__":
    raise SystemExit(main())
