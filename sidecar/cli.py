"""The ``proviso`` command.

Exit codes: 0 success, 1 a refusal or a failed check, 2 usage. Human output by default,
``--format json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import grpc
from google.protobuf import json_format

from sidecar import config
from sidecar.audit.files import AuditLogNotFoundError, log_files, records, verify_log
from sidecar.audit.writer import AuditLogCorruptError
from sidecar.durations import parse_duration
from sidecar.errors import PolicyLoadError, SidecarError
from sidecar.keystore import load_or_create, load_verification_keys
from sidecar.minting import mint
from sidecar.observability import logging as json_logging
from sidecar.policy.issues import Severity, format_issues
from sidecar.policy.loader import lint_policy, load_policy
from tokens import Grant, KeyFormatError, VerificationKeys

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
DEFAULT_TARGET = "127.0.0.1:50051"


class UsageError(Exception):
    """Bad command-line input: exit 2."""


def _fail(message: str, code: int = EXIT_REFUSED) -> int:
    print(f"proviso: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the sidecar until SIGINT or SIGTERM."""
    try:
        settings = config.build(
            policies=args.policies,
            listen=args.listen,
            metrics_listen=args.metrics_listen,
            state_dir=args.state_dir,
            idp_jwks=args.idp_jwks,
            idp_issuer=args.idp_issuer,
            log_level=args.log_level,
        )
    except config.SettingsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    json_logging.configure(settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except PolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"policy bundle {settings.policies} has errors; not serving")
    except AuditLogCorruptError as exc:
        return _fail(f"not serving: {exc}")
    except (OSError, ValueError) as exc:
        return _fail(f"cannot start: {exc}")


async def _serve(settings: config.Settings) -> int:
    from sidecar.app import App  # noqa: PLC0415 - keep `proviso lint` and `check` fast to start

    app = await App.start(settings)
    policy = app.policy.current
    print(f"proviso: serving gRPC on {settings.listen.host}:{app.grpc_port}", flush=True)
    print(f"proviso: metrics on http://{settings.metrics_listen}/metrics", flush=True)
    print(f"proviso: policy {settings.policies} version {policy.version}", flush=True)
    print(f"proviso: audit log {settings.audit_path}", flush=True)
    if settings.dev_mode:
        print(
            "proviso: WARNING dev mode: no IdP configured; the dev IdP in "
            f"{settings.state_dir / 'dev-idp'} is trusted for issuers, approvers and admins. "
            "Never use dev mode in production (configure --idp-jwks).",
            file=sys.stderr,
            flush=True,
        )
    print(
        "proviso: try: proviso token issue --agent billing-resolution-agent@service "
        "--grant 'requestRefund:invoice_id=in_93K2' --ttl 15m",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print("proviso: stopping (finishing calls in flight)", flush=True)
    await app.stop()
    return EXIT_OK


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


# ---------------------------------------------------------------- token issue


def parse_grant(text: str) -> Grant:
    """``TOOL[:ARG=VALUE,...]`` into a Grant."""
    tool, _, pin_text = text.partition(":")
    if not tool:
        raise UsageError(f"--grant {text!r}: expected TOOL[:ARG=VALUE,...]")
    pins: dict[str, str] = {}
    for item in filter(None, pin_text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--grant {text!r}: pin {item!r} is not ARG=VALUE")
        if name in pins:
            raise UsageError(f"--grant {text!r}: pin {name!r} given twice")
        pins[name] = value
    return Grant(tool=tool, pins=MappingProxyType(pins))


def cmd_token_issue(args: argparse.Namespace) -> int:
    """Mint a capability token with the local key, within the agent's ceiling."""
    try:
        grants = [parse_grant(g) for g in args.grant]
        ttl = parse_duration(args.ttl)
    except (UsageError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        policy = load_policy(Path(args.policies))
    except PolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"policy bundle {args.policies} has errors")
    keys = load_or_create(Path(args.state_dir))
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
    if args.format == "json":
        print(
            json.dumps(
                {
                    "token": minted.token,
                    "token_id": minted.token_id,
                    "key_id": minted.key_id,
                    "expires_at": minted.expires_at,
                    "ttl_seconds": minted.ttl_seconds,
                }
            )
        )
    else:
        print(minted.token)
        if minted.ttl_seconds < ttl:
            print(f"proviso: ttl capped at {minted.ttl_seconds}s by the role", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Ask a running sidecar for one decision and print it as JSON."""
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
    with grpc.insecure_channel(args.target) as channel:
        stub = authz_grpc.AuthorizationServiceStub(channel)
        try:
            response = stub.Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            return _fail(f"{exc.code().name}: {exc.details()}")
    print(
        json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True), indent=2)
    )
    return EXIT_OK if response.decision == authz_pb.DECISION_ALLOW else EXIT_REFUSED


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
    """Prove the audit log's hash chain and checkpoint signatures; exit 1 at the first break."""
    try:
        keys = _verification_keys(args)
        files = log_files(_audit_path(args.path, args.state_dir))
    except (UsageError, AuditLogNotFoundError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    result = verify_log(files, keys)
    state, broken = result.state, result.broken
    unsealed = state.unsealed
    report = {
        "ok": broken is None and not (args.require_sealed and unsealed),
        "files": [str(path) for path in files],
        "records": state.records,
        "checkpoints": state.checkpoints,
        "first_seq": state.first_seq or 0,
        "last_seq": state.seq,
        "sealed_through": state.sealed_seq,
        "unsealed": unsealed,
        "kids": sorted(state.kids),
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
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        span = f"seq {state.first_seq}-{state.seq}" if state.seq else "no records"
        summary = (
            f"{span}, {state.records} records, {state.checkpoints} signed checkpoints "
            f"in {len(files)} file(s)"
        )
        if broken is not None:
            print(f"BROKEN at {broken}")
            print(f"verified before it: {summary}")
        else:
            print(f"ok: {summary}")
        if unsealed and broken is None:
            print(
                f"{'error' if args.require_sealed else 'note'}: the last {unsealed} record(s) "
                f"(seq {state.sealed_seq + 1}-{state.seq}) follow the last checkpoint: chained "
                "but not signed yet, so a cut there would not show (a live or crashed sidecar's "
                "tail; a cleanly stopped one ends with a checkpoint)"
            )
    return EXIT_OK if report["ok"] else EXIT_REFUSED


def cmd_audit_trace(args: argparse.Namespace) -> int:
    """Rebuild one run from the audit log: every Check in order, with why it was decided."""
    from sidecar.audit import trace  # noqa: PLC0415 - only this command needs it

    try:
        found = trace.load_trace(_audit_path(args.audit, args.state_dir), args.run_id)
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

    try:
        files = log_files(_audit_path(args.audit, args.state_dir))
    except AuditLogNotFoundError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        policy = load_policy(Path(args.policies))
    except PolicyLoadError as exc:
        print(format_issues(exc.issues, "text"), file=sys.stderr)  # type: ignore[arg-type]
        return _fail(f"policy bundle {args.policies} has errors")
    report = replay.replay(records(files), policy, examples=args.examples, run_id=args.run_id)
    if args.format == "json":
        print(json.dumps(replay.to_json(report), indent=2, ensure_ascii=False))
    else:
        print(replay.to_table(report))
    return EXIT_REFUSED if args.fail_on_change and report.changed else EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proviso", description="Policy-as-code authorization sidecar for AI agents."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the sidecar", description=cmd_serve.__doc__)
    serve.add_argument("--policies", metavar="DIR", help="policy bundle (default: policies)")
    serve.add_argument("--listen", metavar="HOST:PORT", help=f"gRPC (default {DEFAULT_TARGET})")
    serve.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="HTTP /metrics (default 127.0.0.1:9464)"
    )
    serve.add_argument("--state-dir", metavar="DIR", help="keys and state (default ./.proviso)")
    serve.add_argument("--idp-jwks", metavar="FILE", help="the IdP's JWKS; disables dev mode")
    serve.add_argument("--idp-issuer", metavar="ISS", help="the IdP's issuer (iss)")
    serve.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    serve.set_defaults(handler=cmd_serve)

    lint = commands.add_parser("lint", help="check a policy bundle", description=cmd_lint.__doc__)
    lint.add_argument("directory", metavar="DIR")
    lint.add_argument("--format", choices=("text", "json"), default="text")
    lint.set_defaults(handler=cmd_lint)

    token = commands.add_parser("token", help="capability tokens", description="Tokens.")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    issue = token_commands.add_parser(
        "issue", help="mint a token with the local key", description=cmd_token_issue.__doc__
    )
    issue.add_argument("--agent", required=True, metavar="ID")
    issue.add_argument(
        "--grant", required=True, action="append", metavar="TOOL[:ARG=VALUE,...]",
        help="a tool the token allows, with resource pins; repeat for more tools",
    )  # fmt: skip
    issue.add_argument("--ttl", default="15m", help="lifetime, capped by the role (default 15m)")
    issue.add_argument("--run-id", default=None, metavar="ID", help="bind the token to a run")
    issue.add_argument("--policies", default="policies", metavar="DIR")
    issue.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
    issue.add_argument("--issuer", default=config.DEFAULT_TOKEN_ISSUER, help=argparse.SUPPRESS)
    issue.add_argument("--audience", default=config.DEFAULT_AUDIENCE, help=argparse.SUPPRESS)
    issue.add_argument("--format", choices=("text", "json"), default="text")
    issue.set_defaults(handler=cmd_token_issue)

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
    check.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT")
    check.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    check.set_defaults(handler=cmd_check)
    _add_audit_commands(commands)
    return parser


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
    trace.add_argument("run_id", metavar="RUN_ID")
    trace.add_argument("--audit", metavar="PATH", help="the log (default: STATE_DIR/audit)")
    trace.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
    trace.add_argument("--format", choices=("table", "json"), default="table")
    trace.set_defaults(handler=cmd_audit_trace)

    replay = commands.add_parser(
        "replay", help="re-decide recorded checks under another policy",
        description=cmd_replay.__doc__,
    )  # fmt: skip
    replay.add_argument("--audit", metavar="PATH", help="the log (default: STATE_DIR/audit)")
    replay.add_argument("--state-dir", default=config.DEFAULT_STATE_DIR, metavar="DIR")
    replay.add_argument("--policies", required=True, metavar="DIR", help="the candidate bundle")
    replay.add_argument("--run-id", default=None, metavar="ID", help="replay only this run")
    replay.add_argument("--examples", type=int, default=5, metavar="N",
                        help="changed checks to show per kind of change (default 5)")  # fmt: skip
    replay.add_argument("--fail-on-change", action="store_true",
                        help="exit 1 if any decision would change (for CI)")  # fmt: skip
    replay.add_argument("--format", choices=("table", "json"), default="table")
    replay.set_defaults(handler=cmd_replay)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
