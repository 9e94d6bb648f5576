"""Store locations: the one parser of where a store lives, and how a URL is shown.

A location is a directory path (``str`` or ``os.PathLike``) or a URL whose scheme
:data:`STORE_SCHEMES` maps to a kind of store. :func:`parse_location` is the only
place a location is read (block stores, tiers, snapshot stores), so a location means
the same everywhere; :func:`redact_url` is how every repr, log line and error message
of pagedkv shows a URL (never its password).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

# URL scheme -> kind of store. A location without a scheme is a directory path
# ("path"). To add a store: a row here, and an opener for its kind in each user of
# parse_location that supports it (open_store below; the snapshot store).
STORE_SCHEMES: dict[str, str] = {
    "file": "path",
    "memory": "memory",
    "redis": "redis",
    "rediss": "redis",
    "redis+cluster": "redis-cluster",
    "rediss+cluster": "redis-cluster",
}

# RFC 3986 scheme, at the start; one letter is a Windows drive ("C:"), not a scheme.
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


class Location(NamedTuple):
    """A parsed store location.

    ``kind``: ``"path"`` (a directory), or the kind :data:`STORE_SCHEMES` gives the
    URL's scheme. ``target``: the directory path for ``"path"`` (a ``file://`` URL
    decoded), the URL otherwise (its scheme in lower case, the rest unchanged).
    ``scheme``: the URL's scheme (lower case), ``None`` for a plain path.
    """

    kind: str
    target: str
    scheme: str | None

    @property
    def shown(self) -> str:
        """A printable form: the path, or the URL without its user and password."""
        if self.scheme is None or self.kind == "path":
            return self.target
        hosts = self.target.partition("://")[2].rpartition("@")[2]
        if "," in hosts.partition("/")[0].partition("?")[0]:  # a cluster's list of nodes
            return shown_nodes(self.target)
        try:
            parts = urlsplit(self.target)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # a malformed port: show no more than the scheme
            return f"{self.scheme}://?"
        return f"{self.scheme}://{host}{port}{parts.path}"


def known_schemes() -> str:
    """The accepted URL schemes, for messages: ``"file://, memory://, ..."``."""
    return ", ".join(s + "://" for s in STORE_SCHEMES)


def parse_location(location: object) -> Location:
    """Parse a store location: a directory path (``str`` or ``os.PathLike``) or a URL.

    The one parser every store location goes through (block stores, tiers, snapshot
    stores), so a location means the same everywhere. A ``scheme://`` that is not in
    :data:`STORE_SCHEMES` raises ``ValueError`` naming the known schemes, and so does a
    known scheme missing its ``//`` (``redis:host``): neither is silently taken as a
    directory name. Messages never show a URL itself (it may hold a password).
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
        if not isinstance(location, str):
            raise TypeError(f"a store location must be a str path or URL, got bytes {location!r}")
        return Location("path", _check_path(location), None)
    if not isinstance(location, str):
        raise TypeError(
            f"a store location must be a directory path or a URL ({known_schemes()}), "
            f"got {type(location).__name__}"
        )
    m = _SCHEME_RE.match(location)
    if m is not None:
        scheme, rest = m.group(1).lower(), location[m.end() :]
        kind = STORE_SCHEMES.get(scheme)
        if rest.startswith("//"):
            if kind is None:
                raise ValueError(
                    f"unknown scheme {scheme + '://'!r} in a store location; use one of "
                    f"{known_schemes()} or a directory path"
                )
            if kind == "path":
                return Location("path", _file_url_path(location), scheme)
            return Location(kind, f"{scheme}:{rest}", scheme)  # the scheme in lower case
        if kind is not None:
            raise ValueError(
                f"store location starts with {scheme + ':'!r} but not {scheme + '://'!r}; "
                f"write it as a URL ({scheme}://...) or, for a directory, as ./{scheme}:..."
            )
    return Location("path", _check_path(location), None)


def _check_path(path: str) -> str:
    if not path or "\x00" in path:
        raise ValueError(f"a store directory path must be non-empty, without NUL; got {path!r}")
    return path


def _file_url_path(location: str) -> str:
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file:// URL names host {parts.netloc!r}; a local directory is file:///path "
            "(three slashes)"
        )
    return _check_path(unquote(parts.path))


# Query parameters of a store URL whose values are shown as given; any other value may
# be a credential (``?password=``, ``?token=``) and is shown as ``***``.
_SHOWN_QUERY = frozenset(
    {
        "db",
        "protocol",
        "timeout",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "health_check_interval",
        "max_connections",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "decode_responses",
        "encoding",
    }
)


def redact_url(url: str) -> str:
    """``url`` fit to print: a password in it becomes ``***``, and so do query values
    other than known harmless options; a fragment is dropped.

    ``redis://user:pw@host:6379/0?password=pw&db=1`` ->
    ``redis://user:***@host:6379/0?password=***&db=1``. Works on text that is not a
    valid URL too (never raises): everything before the last ``@`` of the part ahead of
    the query is user information, so a password holding ``/`` or ``#`` is hidden whole.
    Text without ``://`` is a path and comes back unchanged. Every repr, log line and
    error message of pagedkv that names a URL goes through it.
    """
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:  # a path, not a URL: nothing in it is user information
        return text
    hidden = []  # the secrets found, hidden wherever else they appear too
    user_info, at, tail = rest.rpartition("@")
    if at:
        user, colon, password = user_info.partition(":")
        if any(c in user for c in "/?#"):  # not a user name: a password held one of these
            user, colon, password = "", ":", user_info
        hidden.append(password)
        shown = f"{scheme}{sep}{user}{':***' if colon else ''}@"
    else:
        shown, tail = f"{scheme}{sep}", rest
    tail = tail.partition("#")[0]
    path, qmark, query = tail.partition("?")
    shown += path
    if qmark:
        params = []
        for item in query.split("&"):
            name, eq, value = item.partition("=")
            if eq and name.lower() not in _SHOWN_QUERY:
                hidden.append(value)
                value = "***"
            params.append(f"{name}{eq}{value}")
        shown += "?" + "&".join(params)
    # Also where a secret appears elsewhere in the text (a mistyped option); not one of
    # under 4 characters, which would garble the host and port and protects nothing.
    for secret in sorted((h for h in hidden if len(h) >= 4), key=len, reverse=True):
        head, star, rest = shown.partition(":***@")  # keep the marker readable
        shown = head.replace(secret, "***") + star + rest.replace(secret, "***")
    return shown


def shown_nodes(url: str) -> str:
    """A cluster URL without user information or query: ``redis+cluster://h1:p1,h2:p2``."""
    scheme, _, rest = url.partition("://")
    hosts = rest.rpartition("@")[2].partition("#")[0].partition("?")[0].partition("/")[0]
    return f"{scheme.lower()}://{hosts}"
