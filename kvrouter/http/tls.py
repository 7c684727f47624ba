"""The TLS contexts of the router, built in one place from the configuration (``ssl`` only).

* :func:`server_context` – the listening sockets serve HTTPS with ``server.tls-cert-path`` and
  ``server.tls-key-path``;
* :func:`client_context` – how the router verifies instances registered with ``https://``
  (``manager.tls-ca``, else the system CAs) and the certificate it presents to them
  (``manager.tls-client-cert`` / ``tls-client-key``, mutual TLS). One context serves both the
  data plane (:class:`kvrouter.http.upstream.UpstreamPool`) and the control plane
  (:class:`kvrouter.control.transport.Transport`), so both verify an instance alike.

Both are checked when the configuration is loaded (:func:`check`), so that an unreadable or
mismatched file stops startup with ``config error: <file>: <key>: <reason>``.
"""

from __future__ import annotations

import ssl

from kvrouter.config import ConfigError, RouterConfig

ALPN = ["http/1.1"]          # the only protocol the router speaks


class _Encrypted(Exception):
    """An encrypted private key: there is no passphrase to give, and no terminal to ask."""


def _no_passphrase() -> bytes:
    # without a callback OpenSSL would prompt on the terminal and block startup
    raise _Encrypted


def _error(cfg: RouterConfig, key: str, reason: object) -> ConfigError:
    return ConfigError(f"config error: {cfg.config_path}: {key}: {reason}")


def _load_pair(ctx: ssl.SSLContext, cfg: RouterConfig, cert: str, key: str,
               cert_key: str, key_key: str) -> None:
    """``ctx.load_cert_chain(cert, key)``; an error names the key whose file is at fault."""
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
        return
    except _Encrypted:
        raise _error(cfg, key_key, "encrypted private keys are not supported") from None
    except (OSError, ssl.SSLError) as exc:
        failure = exc
    try:   # which file is it: does the certificate file hold a certificate?
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (OSError, ssl.SSLError) as exc:
        raise _error(cfg, cert_key, f"not a PEM certificate: {exc}") from None
    raise _error(cfg, key_key, f"not a PEM private key matching {cert_key}: {failure}") from None


def server_context(cfg: RouterConfig) -> ssl.SSLContext | None:
    """The context of the listening sockets (``None``: plain HTTP): TLS ≥ 1.2, ALPN
    ``http/1.1``, no client certificate asked."""
    s = cfg.server
    if not s.tls_cert_path:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    _load_pair(ctx, cfg, s.tls_cert_path, s.tls_key_path,
               "server.tls-cert-path", "server.tls-key-path")
    return ctx


def client_context(cfg: RouterConfig) -> ssl.SSLContext | None:
    """The context for ``https://`` instances: verifies their certificate and host name
    against ``manager.tls-ca`` (default: the system CAs), TLS ≥ 1.2, and presents
    ``manager.tls-client-cert`` if set. ``None`` when neither is set: the clients' own
    defaults (the system CAs) apply, and no process pays for loading them before an
    ``https://`` instance shows up."""
    m = cfg.manager
    if not (m.tls_ca or m.tls_client_cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=m.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise _error(cfg, "manager.tls-ca", f"not a PEM CA bundle: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    if m.tls_client_cert:
        _load_pair(ctx, cfg, m.tls_client_cert, m.tls_client_key,
                   "manager.tls-client-cert", "manager.tls-client-key")
    return ctx


def check(cfg: RouterConfig) -> None:
    """Build the contexts the configuration asks for once, to stop startup on a bad file."""
    server_context(cfg)
    client_context(cfg)
