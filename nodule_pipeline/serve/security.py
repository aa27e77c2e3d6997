"""Who may ask the search server, and what it writes down: the token, the session cookie of the
page, the trusted Host names, the content types each POST takes, the access log and the audit.

The library holds patient identifiers, so every rule here answers an attack that was tried:

- a token (``NODULE_PIPELINE_SERVE_TOKEN`` or ``--token-file``) is asked for every API request,
  as ``Authorization: Bearer`` or as the HttpOnly, SameSite=Strict session cookie the page gets
  once signed in; without one the server only binds to loopback (see ``cmd_serve``);
- the Host header must name this server (localhost names, the bound address, ``--allowed-host``),
  so a DNS-rebinding page that resolves its own name to 127.0.0.1 reads nothing;
- a POST must carry its endpoint's content type, so a cross-site "simple" request (text/plain,
  form data) is refused before it acts, and a cross-origin one is refused by its Origin;
- the access log drops query strings and ids; the audit log (:mod:`~nodule_pipeline.serve.audit`)
  takes one line per search, upload, nodule view and sign-in, written off the request path.

A pure ASGI middleware (no per-request objects beyond a dict) keeps this under a tenth of a
millisecond per request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.serve.audit import AuditLog

TOKEN_ENV = "NODULE_PIPELINE_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16
SESSION_COOKIE = "nodule_session"
SESSION_SECONDS = 12 * 3600
"""A signed-in page stays signed in for a working day (then signs in again)."""
MAX_SESSIONS = 1000
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/", "/openapi.json", "/api/session")
"""What answers without a token: the page itself (it then signs in), its API description, sign-in."""
CONTENT_TYPES = {
    "/api/search": ("application/json",),
    "/api/session": ("application/json",),
    "/api/series": ("application/zip", "application/x-zip-compressed", "application/octet-stream"),
    "/api/search/upload": ("application/octet-stream", "image/png"),
    "/api/pacs/series": ("application/json",),
}
"""The content types each POST takes; anything else is a 415 (a cross-site form or text/plain
POST needs no preflight, so it must not be able to act)."""
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

access_log = logging.getLogger("nodule_pipeline.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def read_token(env_value: str | None, token_file: str | None) -> str | None:
    """The server's token from ``--token-file`` or the environment (None: no token configured);
    one shorter than :data:`MIN_TOKEN_LENGTH` characters is refused, naming where it came from."""
    if token_file is not None:
        try:
            token, source = Path(token_file).read_text().strip(), f"the token file {token_file}"
        except (OSError, UnicodeDecodeError) as error:
            raise InputDataError(f"cannot read the token file {token_file} ({error})") from None
    elif env_value is not None:
        token, source = env_value.strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise InputDataError(
            f"{source} holds {len(token)} characters; a token needs at least {MIN_TOKEN_LENGTH} "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_id(token: str) -> str:
    """Who asked, in the audit log: a short digest of the token, never the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass
class Access:
    """The server's rules: its token (None: loopback only, every request is "local"), the Host
    names it answers to, and the signed-in page sessions (in memory: a restart signs pages out)."""

    token: str | None = None
    allowed_hosts: frozenset[str] = frozenset(LOCAL_HOSTS)
    _sessions: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_server(cls, token: str | None, bind_host: str, extra_hosts: list[str] | tuple[str, ...] = ()) -> Access:
        hosts = {*LOCAL_HOSTS, *(host.strip().lower() for host in extra_hosts)}
        if bind_host not in ("0.0.0.0", "::", ""):
            hosts.add(bind_host.lower())
        return cls(token, frozenset(hosts))

    def bearer(self, presented: str) -> str | None:
        """The token id when ``presented`` is the server's token (compared in constant time)."""
        if self.token is None or not hmac.compare_digest(presented.encode(), self.token.encode()):
            return None
        return token_id(self.token)

    def open_session(self, presented: object) -> tuple[str, str] | None:
        """(session id, who) for a page that signed in with the right token, else None."""
        who = self.bearer(presented) if isinstance(presented, str) else None
        if who is None:
            return None
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session] = (who, time.monotonic() + SESSION_SECONDS)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session, who

    def close_session(self, session: str | None) -> None:
        with self._lock:
            self._sessions.pop(session or "", None)

    def session(self, session: str) -> str | None:
        with self._lock:
            found = self._sessions.get(session)
            if found is not None and found[1] < time.monotonic():
                del self._sessions[session]
                found = None
        return found[0] if found else None

    def who(self, headers: dict[bytes, bytes]) -> str | None:
        """Who sent a request (a token id, or "local" without a token), None when not signed in."""
        if self.token is None:
            return "local"
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() == "bearer" and presented:
            return self.bearer(presented.strip())
        cookie = _cookie(headers.get(b"cookie", b"").decode("latin-1"), SESSION_COOKIE)
        return self.session(cookie) if cookie else None

    def host_allowed(self, host_header: str) -> bool:
        return _hostname(host_header) in self.allowed_hosts


def _hostname(host_header: str) -> str:
    """The name of a Host header without its port ("[::1]:8000" is "::1")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def session_cookie(session: str, secure: bool) -> str:
    return f"{SESSION_COOKIE}={session}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict" + (
        "; Secure" if secure else ""
    )


def ended_session_cookie(secure: bool) -> str:
    return f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")


def loggable_path(path: str) -> str:
    """A request path for the access log: nodule and series ids (patient identifiers) left out."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "api" and parts[2] in ("nodules", "series") and parts[3]:
        parts[3] = "{id}"
    return "/".join(parts)


def audited_action(method: str, path: str) -> str | None:
    """What the audit log calls a request, None for those it leaves out (the page, pictures)."""
    if method == "POST":
        posts = {
            "/api/search": "search",
            "/api/search/upload": "search",
            "/api/series": "series upload",
            "/api/pacs/series": "pacs series open",
        }
        return posts.get(path, "sign in" if path == "/api/session" else None)
    parts = path.split("/")
    if method == "GET" and len(parts) == 4 and parts[1:3] == ["api", "nodules"]:
        return "nodule view"
    if method == "GET" and path == "/api/nodules":
        return "nodule list"
    if method == "GET" and path.startswith("/api/pacs/"):  # the PACS's patient ids and studies
        return "pacs list"
    return None


class Guard:
    """The ASGI middleware that applies :class:`Access` to each request, adds the security
    headers, writes the access log and hands each audited request's line to the audit log."""

    def __init__(self, app: ASGIApp, access: Access, audit: AuditLog | None):
        self.app, self.access, self.audit = app, access, audit

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])  # the last of a repeated header; Host is never repeated
        client = scope.get("client")
        address = client[0] if client else "-"
        status = 500
        who: str | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = list(SECURITY_HEADERS)
                if path.startswith("/api/") and not any(key == b"cache-control" for key, _ in message["headers"]):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        refusal = self._refusal(method, path, headers)
        try:
            if refusal is not None:
                await _answer(send_with_headers, *refusal)
                return
            who = self.access.who(headers)
            if who is None and not (path in PUBLIC_PATHS or path.startswith("/static/")):
                await _answer(
                    send_with_headers,
                    401,
                    "sign in: send the server's token as 'Authorization: Bearer <token>', or sign in on the page",
                    [(b"www-authenticate", b'Bearer realm="nodule-pipeline"')],
                )
                return
            state = scope.setdefault("state", {})
            state["who"] = who
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            access_log.info('%s "%s %s" %d %.1f ms', address, method, loggable_path(path), status, elapsed_ms)
            self._audit(scope, method, path, who, address, status)

    def _refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """(status, reason) when the request is refused before anyone looks at who sent it."""
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.access.host_allowed(host):
            name = _hostname(host)
            return 400, f"this server does not answer to the host {name!r} (start it with --allowed-host {name})"
        if method == "POST":
            origin = headers.get(b"origin")
            if origin is not None and origin.decode("latin-1").partition("://")[2].lower() != host.lower():
                return 403, f"cross-origin requests are refused (from {origin.decode('latin-1')!r})"
            taken = CONTENT_TYPES.get(path)
            given = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if taken is not None and given not in taken:
                return 415, f"POST {path} takes {' or '.join(taken)}, not {given or 'a body without a content type'}"
        return None

    def _audit(self, scope: Scope, method: str, path: str, who: str | None, address: str, status: int) -> None:
        if self.audit is None:
            return
        action = audited_action(method, path) or ("refused" if status in (400, 401, 403, 415) and who is None else None)
        if action is None:
            return
        state = scope.get("state", {})
        who = state.get("who", who)  # a sign-in names who it signed in
        self.audit.record(
            {"who": who or "unknown", "client": address, "action": action, **state.get("audit", {}), "status": status}
        )


async def _answer(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
