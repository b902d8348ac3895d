"""Which worker URLs an admin may attach: parsed and compared, never matched as strings.

An allow-list entry is an origin, ``scheme://host[:port]``; without a port (or with an empty one, as in
the default ``http://127.0.0.1:``) any port of that host is allowed. A worker URL is allowed when its
scheme and host equal an entry's (host names compared case-insensitively, IPv6 without brackets) and its
port does, if the entry names one. A URL with userinfo (``http://127.0.0.1:80@other-host/``), a query or
a fragment is refused whatever the list says: none of them has a meaning for a worker's base URL, and
each has been used to make a prefix check pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from yarl import URL

from cache.api.errors import ApiError

SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int | None  # None: any port

    def allows(self, other: Origin) -> bool:
        return (self.scheme, self.host) == (other.scheme, other.host) and self.port in (None, other.port)


def parse_origin(entry: str) -> Origin:
    """An allow-list entry; ValueError if it is not ``scheme://host[:port]``."""
    parts = urlsplit(entry)
    if parts.scheme not in SCHEMES or not parts.hostname or parts.username is not None:
        raise ValueError(f"allow-list entry {entry!r} is not scheme://host[:port]")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"allow-list entry {entry!r} is not scheme://host[:port]")
    return Origin(parts.scheme, parts.hostname.lower(), parts.port)


def check_worker_url(url: object, allowed: tuple[str, ...]) -> str:
    """``url`` normalised (no trailing slash) if an admin may attach it; otherwise a 400 (not a URL a
    worker can have) or a 403 (not allowed)."""
    if not isinstance(url, str):
        raise ApiError(400, "'url' must be a string", param="url")
    if any(c <= " " or c in "\\@?#" for c in url):  # userinfo, query, fragment, parser confusion
        raise ApiError(400, "'url' must not carry userinfo, a query, a fragment or spaces", param="url")
    try:
        parsed = URL(url)  # the HTTP client's own parser: what is checked is what gets connected to
        port = parsed.port
    except ValueError as exc:
        raise ApiError(400, f"'url' is not a valid URL: {exc}", param="url") from None
    if parsed.scheme not in SCHEMES or not parsed.host or port is None:
        raise ApiError(400, "'url' must be an http(s) URL with a host", param="url")
    target = Origin(parsed.scheme, parsed.host.lower(), port)
    if not any(parse_origin(entry).allows(target) for entry in allowed):
        raise ApiError(403, f"worker URL not allowed; allowed: {', '.join(allowed)}", param="url")
    return url.rstrip("/")
