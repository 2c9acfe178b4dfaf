"""The request target in one canonical form: what every decision reads and the proxy forwards.

Why: LM Studio's server is Express. Its router matches paths in any case and ignores a trailing
slash, and Node's URL parser reads ``\\`` as ``/``. A gateway that compared the client's path
exactly and forwarded the client's bytes would decide "not an admin route" on
``/api/v1/Models/load`` while LM Studio loads a model. So the request target is rewritten once, at
the outermost layer (``gateway.request.routes.RequestNormalisation``), and everything after it (auth, the
admin rule, validation, routing, the proxy's URL) reads and forwards that one form.

The path (:func:`resolve_path`, then the route table's spelling in ``RouteTable.normalise``):

* percent-escapes decoded once, except ``%2F``: an encoded slash is data inside a segment (a model
  key such as ``google%2Fgemma``), kept as ``%2F``, never a separator;
* dot segments resolved (RFC 3986 §5.2.4) and empty segments (``//``) dropped;
* refused with ``400 bad_request`` when it cannot be read one way only: a ``%`` that starts no
  escape, an encoded ``%`` (``%25``: double encoding, ``%252e``), bytes that are not UTF-8 once
  decoded, NUL and other control characters, ``\\``, ``;`` (``..;/`` path parameters), and an
  encoded ``?`` or ``#``.

The query (:func:`strip_credentials`): parameters that carry a key (``api_key``, ``key``,
``access_token``, ...) are removed, so a key sent in the URL never reaches the upstream, the
logs or the traces. lmgate does not accept a key from the query for its own auth either: URLs are
logged by every proxy on the way.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_plus

from middleware.errors import BadRequest

__all__ = ["CREDENTIAL_PARAMETERS", "BadPath", "ascii_lower", "resolve_path", "strip_credentials", "wire_path"]

#: Query parameters that hold a key, compared in lower case once percent-decoded.
CREDENTIAL_PARAMETERS = frozenset(
    {"api_key", "api-key", "apikey", "key", "access_token", "token", "x-api-key", "authorization"}
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASH_ESCAPE = "%2F"
# Characters a path keeps as they are on the wire (RFC 3986 pchar and "/"); "%" only starts the
# kept "%2F", since every other escape was decoded. Everything else is percent-encoded.
_WIRE_SAFE = "/%!$&'()*+,=:@-._~"
_REFUSED = {"\\": "a backslash", ";": "a ';' (path parameters)", "?": "an encoded '?'", "#": "an encoded '#'"}
_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


class BadPath(BadRequest):
    """The path cannot be read one way only; rendered as 400 ``bad_request``."""


def ascii_lower(text: str) -> str:
    """Lower-case A-Z only: Express folds ASCII letters, and Unicode folding could map a foreign
    character onto a route's letter (the Kelvin sign onto ``k``)."""
    return text.translate(_LOWER)


def resolve_path(raw: bytes) -> str:
    """The client's raw path (below any mount point) decoded, resolved and checked; see the module."""
    if not raw.startswith(b"/"):
        raise BadPath("The request path must start with '/'.")
    text = _decode(raw)
    for char in text:
        if char < " " or char == "\x7f":
            raise BadPath("The request path holds a NUL or another control character.")
        if char in _REFUSED:
            raise BadPath(f"The request path holds {_REFUSED[char]}; lmgate does not guess what it means.")
    segments: list[str] = []
    for segment in text.split("/")[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = text.endswith(("/", "/.", "/..")) and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def _decode(raw: bytes) -> str:
    out = bytearray()
    index, size = 0, len(raw)
    while index < size:
        byte = raw[index]
        if byte != 0x25:  # "%"
            out.append(byte)
            index += 1
            continue
        pair = raw[index + 1 : index + 3]
        if len(pair) < 2 or not _HEX.issuperset(pair):
            raise BadPath("The request path has a '%' that starts no escape.")
        value = int(pair, 16)
        if value == 0x25:
            raise BadPath("The request path is percent-encoded twice (%25); send it encoded once.")
        out += _SLASH_ESCAPE.encode() if value == 0x2F else bytes((value,))
        index += 3
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("The path is not valid UTF-8 once percent-decoded.") from None


def wire_path(path: str) -> bytes:
    """A canonical path as it goes on the wire (the forwarded URL and ``raw_path``)."""
    return quote(path, safe=_WIRE_SAFE).encode("ascii")


def strip_credentials(query: bytes) -> bytes:
    """``query`` without the parameters that carry a key; every other byte as the client sent it."""
    if not query:
        return query
    kept = [part for part in query.split(b"&") if not _is_credential(part)]
    return b"&".join(kept)


def _is_credential(part: bytes) -> bool:
    name = part.split(b"=", 1)[0].decode("latin-1")
    return ascii_lower(unquote_plus(name, encoding="latin-1").strip()) in CREDENTIAL_PARAMETERS
