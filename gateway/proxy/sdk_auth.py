"""LM Studio's SDK auth packet: the first message on each socket, read, checked and rewritten.

The SDKs (``lmstudio`` 1.5 and later, ``@lmstudio/sdk``) open a WebSocket per namespace and send
one JSON text message before anything else::

    {"authVersion": 1, "clientIdentifier": "<id>", "clientPasskey": "<passkey>"}

With an API token (``LMSTUDIO_API_TOKEN``, or ``api_token=``; SDK 1.6 and later), the token
``sk-lm-<8 letters or digits>:<20 letters or digits>`` is split into those two fields; without one
they are a random guest identity (``guest:<uuid>`` in 1.6, a bare uuid in 1.5) that LM Studio uses
to scope a client's resources (files prepared on ``/files`` and used on ``/llm``). LM Studio
answers ``{"success": true}``, or ``{"success": false, "error": {title, cause, ...}}``, which the
SDK raises as ``LMStudioServerError("Authentication failed: ...")``.

lmgate reads the client's key from the packet (:meth:`AuthPacket.token`, an lmgate client key in
LM Studio's token format), answers a refusal in LM Studio's shape (:func:`refusal`), and forwards
a packet that never carries the client's key (:func:`upstream_packet`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["AuthPacket", "parse_auth_packet", "refusal", "split_token", "upstream_packet"]

#: LM Studio's API token, as the SDK checks it before splitting it.
_TOKEN = re.compile(r"sk-lm-(?P<identifier>[A-Za-z0-9]{8}):(?P<passkey>[A-Za-z0-9]{20})")
_IDENTIFIER = re.compile(r"[A-Za-z0-9]{8}")
_PASSKEY = re.compile(r"[A-Za-z0-9]{20}")


def split_token(token: str | None) -> tuple[str, str] | None:
    """``(clientIdentifier, clientPasskey)`` of an LM Studio token; None for anything else."""
    match = _TOKEN.fullmatch(token.strip()) if token else None
    return (match["identifier"], match["passkey"]) if match else None


@dataclass(frozen=True)
class AuthPacket:
    """A parsed auth packet: its fields as the client sent them."""

    fields: dict[str, Any]

    @property
    def token(self) -> str | None:
        """The token the two fields were split from (``sk-lm-<id>:<passkey>``); None: a guest."""
        identifier, passkey = self.fields.get("clientIdentifier"), self.fields.get("clientPasskey")
        if not (isinstance(identifier, str) and isinstance(passkey, str)):
            return None
        if _IDENTIFIER.fullmatch(identifier) and _PASSKEY.fullmatch(passkey):
            return f"sk-lm-{identifier}:{passkey}"
        return None


def parse_auth_packet(message: str | bytes | None) -> AuthPacket | None:
    """The packet in a socket's first message; None when it is not one (not a JSON object with
    both identity fields as text)."""
    if not isinstance(message, str):
        return None
    try:
        fields = json.loads(message)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    if not all(isinstance(fields.get(name), str) for name in ("clientIdentifier", "clientPasskey")):
        return None
    return AuthPacket(fields)


def upstream_packet(packet: AuthPacket, *, upstream_token: str | None, forward_client_auth: bool = False) -> str:
    """The packet forwarded upstream, as a text message.

    * the upstream's own token (``upstream.api_key`` in LM Studio's format), when configured;
    * else the client's packet when ``upstream.forward_client_auth`` is on, or when it carries a
      guest identity (random, not a secret, and what ties the client's sockets together);
    * else, the client having sent a token, a guest identity derived from it: stable, so its
      sockets share their resources upstream as they would direct, but the token stays here.
    """
    fields = dict(packet.fields)
    own = split_token(upstream_token)
    if own is not None:
        fields["clientIdentifier"], fields["clientPasskey"] = own
    elif not forward_client_auth and (token := packet.token) is not None:
        digest = hashlib.sha256(b"lmgate sdk identity\0" + token.encode("ascii")).hexdigest()
        fields["clientIdentifier"], fields["clientPasskey"] = f"guest:lmgate-{digest[:32]}", digest[32:]
    return json.dumps(fields, separators=(",", ":"))


def refusal(title: str, cause: str, suggestion: str) -> str:
    """A refused auth packet's answer, in LM Studio's shape (the SDK shows title, cause and
    suggestion in its ``Authentication failed`` error)."""
    error = {"title": title, "cause": cause, "suggestion": suggestion}
    return json.dumps({"success": False, "error": error}, separators=(",", ":"))
