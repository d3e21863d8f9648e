"""Bearer tokens for the HTTP apps (`sftlab serve`, `sftlab ui`)."""

from __future__ import annotations

import hmac


def bearer(header: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header, or ""."""
    return header[7:] if header.lower().startswith("bearer ") else ""


def same_secret(given: str | None, secret: str) -> bool:
    return hmac.compare_digest((given or "").encode(), secret.encode())  # constant time: no guessing by timing


# Names a loopback bind answers to. A keyless server on loopback must check the Host header: a web page
# can point a name it controls at 127.0.0.1 (DNS rebinding) and then talk to the server from the browser.
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_HOSTS = (*LOOPBACK_BINDS, "[::1]")


def is_loopback_host(hostname: str | None) -> bool:
    """Whether a request's Host names this machine's loopback (port stripped by the caller)."""
    return (hostname or "").lower() in LOOPBACK_HOSTS
