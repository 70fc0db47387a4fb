"""A refund tool backend that checks the capability token itself: defence in depth.

The agent calls the tool with its Proviso capability token. Before doing anything, the tool
verifies the token offline, with nothing but the ``tokens`` package and the sidecar's public
keys (its JWKS): the signature, the claims, and whether the token allows *this* call, i.e.
this tool, this run, the pinned invoice and the argument constraints (``amount <= 50``). So
the tool refuses an out-of-scope call even if the agent never asked the sidecar, or the
sidecar was bypassed. The sidecar's Check stays the authority for everything a token cannot
say offline: revocations, the current policy, budgets, approvals.

Run it against a sidecar started with ``make run``::

    TOKEN=$(.venv/bin/proviso token issue --as orchestrator@service \\
              --agent billing-resolution-agent@service \\
              --grant 'requestRefund:invoice_id=in_93K2,amount<=50,currency in USD|EUR')
    .venv/bin/python examples/tool_backend.py --token "$TOKEN" \\
        --jwks-url http://127.0.0.1:9464/.well-known/jwks.json \\
        --args '{"invoice_id": "in_93K2", "amount": 49.00, "currency": "USD"}'
    # -> refund of 49.00 USD on in_93K2 for billing-resolution-agent@service   (exit 0)
    # with "amount": 60 -> rejected: OUT_OF_SCOPE: argument 'amount' is 60, outside the
    #                      token's constraint amount <= 50                       (exit 1)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from tokens import TokenError, VerificationKeys, verify_call
from tokens.call import parse_arguments


class RefundTool:
    """The tool: it knows its own name, the sidecar's keys, and who the sidecar is."""

    TOOL = "requestRefund"

    def __init__(
        self,
        jwks: dict[str, Any],
        *,
        audience: str = "proviso",
        issuer: str = "proviso",
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Keys, audience and issuer come from this service's configuration, never from the
        # request or the token itself.
        self._keys = VerificationKeys.from_jwks(jwks)
        self._audience = audience
        self._issuer = issuer
        self._clock = clock

    def handle(self, token: str, body: str, run_id: str | None = None) -> str:
        """Do the refund if the token allows exactly this call.

        Raises:
            TokenError: the token is refused, or does not cover this call (``.code`` says
                why, e.g. ``OUT_OF_SCOPE`` or ``TOKEN_EXPIRED``).
            ValueError: the body is not one JSON object.
        """
        call = verify_call(
            token,
            self._keys,
            audience=self._audience,
            issuer=self._issuer,
            tool=self.TOOL,  # the operation about to run, not a name the caller sent
            arguments=body,
            now=self._clock(),
            run_id=run_id,
        )
        arguments = parse_arguments(body)  # exact decimals, as verify_call read them
        return (
            f"refund of {arguments['amount']} {arguments['currency']} on "
            f"{arguments['invoice_id']} for {call.claims.subject}"
        )


def _load_jwks(args: argparse.Namespace) -> dict[str, Any]:
    if args.jwks:
        with open(args.jwks, encoding="utf-8") as handle:
            document: dict[str, Any] = json.load(handle)
            return document
    if not args.jwks_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise SystemExit("--jwks-url must be https (or http on loopback)")
    with urllib.request.urlopen(args.jwks_url, timeout=5) as response:  # noqa: S310 - checked
        fetched: dict[str, Any] = json.load(response)
        return fetched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jwks", metavar="FILE", help="the sidecar's JWKS, saved to a file")
    source.add_argument("--jwks-url", metavar="URL", help="the sidecar's /.well-known/jwks.json")
    parser.add_argument("--token", required=True)
    parser.add_argument("--args", required=True, metavar="JSON", help="the call's arguments")
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    tool = RefundTool(_load_jwks(args))
    try:
        print(tool.handle(args.token, args.args, args.run_id))
    except TokenError as refusal:
        print(f"rejected: {refusal.code}: {refusal.message}")
        return 1
    except ValueError as malformed:
        print(f"rejected: bad request: {malformed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
