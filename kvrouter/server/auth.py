"""Who may call the router (``auth.*``, README "Authentication").

Three classes of route: ``/health`` is open (load balancers probe it), and so are the
dashboard's static files (no data in them); the inference routes
and ``/v1/models`` take a client key when any is configured; every other route (registration,
listings, abort, ``/metrics``, and any route added later) takes the admin token. FastDeploy
instances send no header, so ``/register`` (and ``/decode_instances``, which PD prefills poll)
is also open to sources in ``register-allow-cidrs``; with ``register-source-must-match`` such an
anonymous registration may only name its own address (checked by ``admin.register``).

:func:`build` makes one :class:`Authenticator` per process (``None`` when nothing is
configured: fd-router's open router). :meth:`Authenticator.check` runs in ``App.handle`` before
the route's handler. A credential is hashed once (SHA-256) and its digest looked up in a dict
of the keys' digests: one lookup whatever the number of keys, and what its timing could reveal
is how much of a digest matched, which tells nothing about a key (a constant-time comparison
with every key cost ~120 µs per request with 1024 keys). Keys are never logged, counted by
name only. The keys file is checked by a timer, never on a request's path.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import re
from typing import TYPE_CHECKING

from kvrouter.config import MAX_KEYS, SECRET_RE, AuthConfig, RouterConfig
from kvrouter.errors import RouterError
from kvrouter.http.request import Request
from kvrouter.server.forward import strip_credentials

if TYPE_CHECKING:
    from kvrouter.metrics import FastCounter

log = logging.getLogger("kvrouter.auth")

OPEN, CLIENT, ADMIN = "open", "client", "admin"
#: Route classes by endpoint; a route not listed here is an admin route.
ROUTE_CLASS = {"/health": OPEN, "/v1/chat/completions": CLIENT, "/v1/completions": CLIENT,
               "/v1/models": CLIENT,
               # the dashboard's static files hold no data (a browser cannot send a token with
               # a navigation); its state, and explain, reveal the fleet: admin
               "/dashboard": OPEN, "/dashboard/dashboard.js": OPEN,
               "/dashboard/dashboard.css": OPEN, "/dashboard/state": ADMIN,
               "/v1/route/explain": ADMIN}
#: Admin routes that sources in ``register-allow-cidrs`` may call without the token.
FROM_ALLOWED_NETWORKS = frozenset({"/register", "/decode_instances"})
#: Routes whose request goes on to instances: a consumed credential is removed there.
PASSES_ON = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/abort_requests"})

RELOAD_SECS = 1.0             # the keys file's mtime, size and inode are checked this often
MAX_FILE_BYTES = 1 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9._:@/+-]{1,64}")
_ADMIN = "\0admin"            # the admin token's label among the keys: never a key name
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_MISSING = (-1, -1, -1)       # the keys file's signature while it cannot be read


class KeysFileError(Exception):
    """``auth.api-keys-file`` cannot be used; the message names the file and line, never a
    key."""


def read_keys_file(path: str) -> list[tuple[str, str | None]]:
    """``(key, name or None)`` per line of a keys file: ``<key> [name]``; blank lines and
    ``#`` comments skipped."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise KeysFileError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    out: list[tuple[str, str | None]] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            raise KeysFileError(f"{path}: line {number}: not ASCII") from None
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) > 2:
            raise KeysFileError(f"{path}: line {number}: expected '<key> [name]'")
        if not SECRET_RE.fullmatch(parts[0]):
            raise KeysFileError(f"{path}: line {number}: the key must be 1 to 512 visible "
                                "ASCII characters")
        if len(parts) == 2 and not _NAME_RE.fullmatch(parts[1]):
            raise KeysFileError(f"{path}: line {number}: the name must be 1 to 64 of "
                                "A-Z a-z 0-9 . _ : @ / + -")
        out.append((parts[0], parts[1] if len(parts) == 2 else None))
        if len(out) > MAX_KEYS:
            raise KeysFileError(f"{path}: more than {MAX_KEYS} keys")
    return out


def source_address(text: str) -> _IP | None:
    """An IP address, IPv4-mapped IPv6 (``::ffff:10.0.0.5``) as IPv4; None if not one."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def names_source(host: str, source: str) -> bool:
    """Whether a registration's ``host`` (an IP literal, not a name: resolving one would put
    DNS on the request path) is the connection's normalised ``source`` address."""
    addr = source_address(host)
    return addr is not None and str(addr) == source


def credential(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The credential the client sent: ``Authorization: Bearer <key>``, else ``x-api-key``;
    ``b""`` for another ``Authorization`` scheme (no key matches it); None for none."""
    auth = xkey = None
    for name, value in headers:
        n = name.lower()
        if n == b"authorization":
            auth = value if auth is None else auth
        elif n == b"x-api-key":
            xkey = value if xkey is None else xkey
    if auth is not None:
        scheme, _, token = auth.strip().partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else b""
    return None if xkey is None else xkey.strip()


def unauthorized(message: str) -> RouterError:
    e = RouterError(401, message, "authentication_error", "invalid_api_key", "unauthorized")
    e.headers = {"WWW-Authenticate": "Bearer"}
    return e


def forbidden(message: str) -> RouterError:
    return RouterError(403, message, "permission_error", "permission_denied", "forbidden")


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("latin-1") if isinstance(key, str) else key).digest()


class Authenticator:
    """The ``auth.*`` rules of one router process; the keys file is re-read when it changes
    (a broken new version keeps the previous keys). Made inside the running event loop (the
    keys file's timer runs on it)."""

    def __init__(self, cfg: AuthConfig, counter: FastCounter) -> None:
        self.admin = bool(cfg.admin_token)
        self.client_open = not cfg.api_keys and not cfg.api_keys_file
        self.forward_client_key = cfg.forward_client_key
        self.must_match = cfg.register_source_must_match
        self.networks = [ipaddress.ip_network(c) for c in cfg.register_allow_cidrs]
        self._counter = counter
        # digest → key name (``_ADMIN`` for the admin token); a digest listed twice takes the
        # later name: api-keys, the admin token, then the keys file
        self._static = {_digest(k): f"key{i}" for i, k in enumerate(cfg.api_keys, 1)}
        self._first_file_key = len(cfg.api_keys) + 1      # positions go on in the file
        if cfg.admin_token:
            self._static[_digest(cfg.admin_token)] = _ADMIN
        self._keys = dict(self._static)
        self._file = cfg.api_keys_file
        self._file_sig: tuple[int, int, int] | None = None
        if self._file:
            self._reload()
            asyncio.get_running_loop().call_later(RELOAD_SECS, self._tick)

    # -- the check ---------------------------------------------------------------------------
    def check(self, req: Request, endpoint: str) -> RouterError | None:
        """The error to answer instead of running the route, or None. A valid credential is
        counted by key name and, where the request goes on to instances, removed from it
        (the admin token always, a client key unless ``forward-client-key``)."""
        cls = ROUTE_CLASS.get(endpoint, ADMIN)
        if cls == OPEN:
            return None
        cred = credential(req.headers)
        who = "" if cred is None else self._keys.get(_digest(cred), "")
        if cls == CLIENT:
            if not self.client_open and not who:
                return unauthorized("Missing API key: send 'Authorization: Bearer <key>'"
                                    if cred is None else "Invalid API key")
        elif who != _ADMIN:
            error = self._refuse_admin(req, endpoint, cred, who)
            if error is not None:
                return error
        if who:
            if who != _ADMIN:
                self._counter.labels(who).inc()
                req.tenant = who            # the admission queue shares fairly between keys
            if endpoint in PASSES_ON and (who == _ADMIN or not self.forward_client_key):
                strip_credentials(req)
        return None

    def _refuse_admin(self, req: Request, endpoint: str, cred: bytes | None,
                      who: str) -> RouterError | None:
        """An admin route without the admin token: allowed only anonymously from an allowed
        network, on the routes FastDeploy instances call."""
        if cred is not None:
            if not who:
                return unauthorized("Invalid admin token")
            return forbidden(f"{endpoint} requires the admin token, not a client key")
        if endpoint in FROM_ALLOWED_NETWORKS and self._allowed_source(req):
            return None
        if endpoint == "/register":
            return forbidden(f"Registration from {req.conn.peer or 'an unknown address'} is "
                             "not allowed: send the admin token, or register from "
                             "auth.register-allow-cidrs")
        if self.admin:
            return unauthorized(f"{endpoint} requires the admin token: send "
                                "'Authorization: Bearer <token>'")
        return forbidden(f"{endpoint} is disabled: auth.admin-token is not set")

    def register_source(self, req: Request) -> str | None:
        """For ``admin.register``: the address an anonymous registration must name (its
        connection's source), or None when it may name any (it carried the admin token, or
        ``register-source-must-match`` is off). Only called after :meth:`check` passed."""
        if not self.must_match or credential(req.headers) is not None:
            return None
        addr = source_address(req.conn.peer)
        return "" if addr is None else str(addr)

    def _allowed_source(self, req: Request) -> bool:
        addr = source_address(req.conn.peer)
        return addr is not None and any(addr in net for net in self.networks)

    # -- the keys file -------------------------------------------------------------------------
    def _tick(self) -> None:
        """The keys file's timer: a change is applied within :data:`RELOAD_SECS`, and a
        request never waits for the file to be read (up to 1 MiB)."""
        try:
            self._reload()
        finally:
            asyncio.get_running_loop().call_later(RELOAD_SECS, self._tick)

    def _reload(self) -> None:
        """Re-read the keys file if its mtime, size or inode changed."""
        try:
            st = os.stat(self._file)
        except OSError as exc:
            if self._file_sig != _MISSING:        # once, not every second
                log.error("auth: cannot read %s (%s); keeping the previous keys",
                          self._file, exc.strerror or exc)
            self._file_sig = _MISSING
            return
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._file_sig:
            return
        self._file_sig = sig
        try:
            pairs = read_keys_file(self._file)
        except KeysFileError as exc:
            log.error("auth: %s; keeping the previous keys", exc)
            return
        keys = dict(self._static)
        for i, (key, name) in enumerate(pairs, self._first_file_key):
            keys[_digest(key)] = name or f"key{i}"
        self._keys = keys
        log.info("auth: %d client keys from %s", len(pairs), self._file)


def build(cfg: RouterConfig, counter: FastCounter, *, announce: bool) -> Authenticator | None:
    """The process's authenticator, None when ``auth.*`` configures nothing (fd-router's
    open router). ``announce``: log what is open (once per router, not per worker)."""
    a = cfg.auth
    on = bool(a.api_keys or a.api_keys_file or a.admin_token or a.register_allow_cidrs)
    if announce:
        s = cfg.server
        where = f"[{s.host}]" if ":" in s.host else s.host
        where += f":{s.port}" if s.port else " (ephemeral port)"
        if not on:
            log.warning("auth is off: anyone who can reach %s can register instances and "
                        "read prompts; see README 'Running in production'", where)
        else:
            log.info("auth is on: %s client keys%s, admin token %s, %d networks may register "
                     "without it", len(a.api_keys) or "no",
                     " + the keys file" if a.api_keys_file else "",
                     "set" if a.admin_token else "not set", len(a.register_allow_cidrs))
            if not a.admin_token:
                log.warning("auth: auth.admin-token is not set: the admin routes are refused "
                            "(/register only from auth.register-allow-cidrs)")
            if not (a.api_keys or a.api_keys_file):
                log.warning("auth: no client keys: the inference routes and /v1/models are "
                            "open to anyone who can reach %s", where)
    return Authenticator(a, counter) if on else None
