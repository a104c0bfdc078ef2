"""The node's HTTP port: the status page, Prometheus metrics, the health check and the two
administrator actions (re-run, re-send).

    GET  /                      the status page (node/status_page.py)
    GET  /admin                 the same page with re-run / re-send buttons (administrator)
    GET  /jobs/<id>/thumbnail.png
    GET  /metrics               Prometheus text format (node/metrics.py)
    GET  /healthz               200 when the database is writable, the spool is above its mark
                                and the workers are alive; 503 naming what is not (no token:
                                it says only which check fails)
    POST /jobs/<id>/rerun       administrator; the form's CSRF field must match
    POST /jobs/<id>/resend

Access ([http], node/settings.py): bound to loopback by default and then open to read; bound
elsewhere a ``token`` is required (settings refuse to start without one), given as
``Authorization: Bearer <token>`` (Prometheus' ``authorization``) or as the password of HTTP
basic auth (a browser asks for it). Read-only unless ``admin_token`` is set; the administrator
gives it as the basic-auth password on ``/admin``. Every form carries a per-job HMAC of the
admin token, so another site cannot make an administrator's browser post one (CSRF).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dipnode.node.ops.status_page import PageView, render

log = logging.getLogger(__name__)

__all__ = ["HttpConfig", "HttpServer", "Site", "csrf_token"]

_JOB_PATH = re.compile(r"^/jobs/(\d{1,18})/(thumbnail\.png|rerun|resend)$")
_MAX_FORM_BYTES = 4096


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    admin_token: str | None = None
    refresh_s: int = 15


class Site(Protocol):
    """What the HTTP port asks of the node (node/server.py implements it)."""

    registry: CollectorRegistry

    def page_view(self, admin_csrf: Callable[[int], str] | None) -> PageView: ...
    def thumbnail(self, job_id: int) -> Path | None: ...
    def health(self) -> dict[str, str | None]: ...  # check -> None when fine, else why not
    def rerun(self, job_id: int) -> str: ...  # raises ValueError with the reason
    def resend(self, job_id: int) -> str: ...


def csrf_token(admin_token: str, job_id: int) -> str:
    return hmac.new(admin_token.encode(), f"job:{job_id}".encode(), hashlib.sha256).hexdigest()


def _presented(header: str | None) -> str | None:
    """The secret in an Authorization header: a bearer token, or a basic-auth password."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            user_pass = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        return user_pass.partition(":")[2] or None
    return None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


class HttpServer:
    """A threaded HTTP server for one node; ``start()`` binds, ``stop()`` closes."""

    def __init__(self, config: HttpConfig, site: Site) -> None:
        self.config = config
        self.site = site
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.port

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"app": self})
        server = ThreadingHTTPServer((self.config.host, self.config.port), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dipnode-http", daemon=True)
        self._thread.start()
        log.info("status page, /metrics and /healthz on http://%s:%d/ (%s)", self.config.host, self.port,
                 "token required" if self.config.token else "no token: loopback only")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- access ----------------------------------------------------------------------------
    def may_read(self, secret: str | None) -> bool:
        c = self.config
        return c.token is None or _same(secret, c.token) or _same(secret, c.admin_token)

    def is_admin(self, secret: str | None) -> bool:
        return _same(secret, self.config.admin_token)


class _Handler(BaseHTTPRequestHandler):
    app: HttpServer
    timeout = 15  # a client that stops sending frees its thread
    server_version = "dipnode"
    sys_version = ""

    def log_message(self, fmt: str, *args: object) -> None:  # the node's log, not stderr
        log.debug("http %s: " + fmt, self.address_string(), *args)

    # -- responses -------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                                                    "form-action 'self'; frame-ancestors 'none'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8", extra)

    def _unauthorized(self, realm: str) -> None:
        self._text(HTTPStatus.UNAUTHORIZED, "401: a token is required (Authorization: Bearer, or basic auth)",
                   {"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'})

    @property
    def _secret(self) -> str | None:
        return _presented(self.headers.get("Authorization"))

    # -- routes ----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        app = self.app
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                checks = app.site.health()
                bad = {k: v for k, v in checks.items() if v}
                text = "ok" if not bad else "; ".join(f"{k}: {v}" for k, v in bad.items())
                self._text(HTTPStatus.OK if not bad else HTTPStatus.SERVICE_UNAVAILABLE, text)
                return
            if path == "/admin":
                if not app.is_admin(self._secret):
                    self._unauthorized("dipnode administrator")
                    return
                admin = app.config.admin_token
                view = app.site.page_view(lambda job_id: csrf_token(admin, job_id))
                self._send(HTTPStatus.OK, render(view).encode(), "text/html; charset=utf-8")
                return
            if not app.may_read(self._secret):
                self._unauthorized("dipnode")
                return
            if path == "/":
                self._send(HTTPStatus.OK, render(app.site.page_view(None)).encode(), "text/html; charset=utf-8")
            elif path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(app.site.registry), CONTENT_TYPE_LATEST)
            elif (m := _JOB_PATH.match(path)) and m[2] == "thumbnail.png":
                file = app.site.thumbnail(int(m[1]))
                if file is None:
                    self._text(HTTPStatus.NOT_FOUND, f"404: no thumbnail for job {m[1]}")
                else:
                    self._send(HTTPStatus.OK, file.read_bytes(), "image/png")
            else:
                self._text(HTTPStatus.NOT_FOUND, "404: not found")
        except Exception:  # the node keeps serving; the trace says what broke
            log.exception("http GET %s failed", path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "500: internal error (see the node's log)")

    def do_POST(self) -> None:
        app = self.app
        path = self.path.split("?", 1)[0]
        m = _JOB_PATH.match(path)
        if not m or m[2] == "thumbnail.png":
            self._text(HTTPStatus.NOT_FOUND, "404: not found")
            return
        if not app.is_admin(self._secret):
            self._unauthorized("dipnode administrator")
            return
        job_id = int(m[1])
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_FORM_BYTES:
            self._text(HTTPStatus.BAD_REQUEST, f"400: expected a form of at most {_MAX_FORM_BYTES} bytes")
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        if not _same((form.get("csrf") or [None])[0], csrf_token(app.config.admin_token or "", job_id)):
            self._text(HTTPStatus.FORBIDDEN, "403: the form's csrf field does not match this job")
            return
        try:
            message = app.site.rerun(job_id) if m[2] == "rerun" else app.site.resend(job_id)
        except (ValueError, KeyError) as exc:
            self._text(HTTPStatus.CONFLICT, f"409: job {job_id}: {str(exc).strip(chr(39))}")
            return
        except Exception:
            log.exception("http POST %s failed", path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "500: internal error (see the node's log)")
            return
        log.info("status page: administrator asked: %s (%s)", message, self.address_string())
        self._send(HTTPStatus.SEE_OTHER, (message + "\n").encode(), "text/plain; charset=utf-8",
                   {"Location": f"/admin#job-{job_id}"})
