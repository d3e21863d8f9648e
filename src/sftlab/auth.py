"""Bearer tokens for the HTTP apps (`sftlab serve`, `sftlab ui`)."""

from __future__ import annotations

import hmac


def bearer(header: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header, or ""."""
    return header[7:] if header.lower().startswith("bearer ") else ""


def same_secret(given: str | None, secret: str) -> bool:
    return hmac.compare_digest((given or "").encode(), secret.encode())  # constant time: no guessing by timing
