"""The HTTP listener: Prometheus exposition, the token JWKS, and a liveness probe.

A small WSGI app on the standard library's threaded server; it only reads in-memory state.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0
    """Seconds a connection may stay silent (socket timeout): a client that connects and sends
    nothing, or sends slowly, would otherwise hold a thread of its own for ever."""

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are noise here; scrapes happen every few seconds."""


class HttpApp:
    """Routes the few paths the sidecar serves over HTTP."""

    def __init__(
        self,
        metrics: Callable[[], bytes],
        jwks: Callable[[], dict[str, Any]],
        unhealthy: Callable[[], str] = str,
    ) -> None:
        """``unhealthy`` says why Checks cannot be answered ("" when they can)."""
        self._metrics = metrics
        self._jwks = jwks
        self._unhealthy = unhealthy

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return self._send(start_response, "405 Method Not Allowed", "text/plain", b"")
        if path == "/metrics":
            return self._send(start_response, "200 OK", CONTENT_TYPE_LATEST, self._metrics())
        if path == "/.well-known/jwks.json":
            body = json.dumps(self._jwks(), sort_keys=True).encode()
            return self._send(start_response, "200 OK", "application/json", body)
        if path == "/healthz":
            problem = self._unhealthy()
            if problem:
                body = f"unavailable: {problem}\n".encode()
                return self._send(start_response, "503 Service Unavailable", "text/plain", body)
            return self._send(start_response, "200 OK", "text/plain", b"ok\n")
        return self._send(start_response, "404 Not Found", "text/plain", b"not found\n")

    @staticmethod
    def _send(start: StartResponse, status: str, content_type: str, body: bytes) -> list[bytes]:
        start(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]


class HttpServer:
    """Serves an HttpApp on a background thread."""

    def __init__(self, app: HttpApp, host: str, port: int) -> None:
        self._server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (also when it never started serving: shutdown()
        would then wait forever for a loop that never ran)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
