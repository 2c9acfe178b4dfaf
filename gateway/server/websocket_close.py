"""Tell the app the close code and reason a WebSocket client sent (hypercorn reports 1006).

hypercorn 0.17-0.18 answers a client's close frame and then hands the app
``websocket.disconnect`` with 1006 (abnormal closure) whatever the client sent: its stream only
learns "the stream closed", after the close frame was consumed. lmgate relays the client's code
and reason to LM Studio (gateway/proxy/websocket.py), so it needs the real ones. The replacement
below is hypercorn's own ``WSStream._handle_events`` plus one step: on the client's close frame
the app is handed ``websocket.disconnect`` with that frame's code and reason first. The 1006
disconnect hypercorn sends when the stream ends then reaches an app that has already finished.
"""

from __future__ import annotations

from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

from gateway.server.patching import is_patched, patch_method

__all__ = ["keep_websocket_close_codes"]

_MARKER = "_lmgate_keeps_close_codes"


async def _handle_events(self: WSStream) -> None:
    for event in self.connection.events():
        if isinstance(event, Message):
            try:
                self.buffer.extend(event)
            except FrameTooLargeError:
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                break
            if event.message_finished:
                assert self.app_put is not None
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            if self.app_put is not None:  # the one added step: the client's own code and reason
                await self.app_put({"type": "websocket.disconnect", "code": event.code, "reason": event.reason or ""})
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            await self.send(StreamClosed(stream_id=self.stream_id))


def keep_websocket_close_codes() -> None:
    """Install the replacement once (idempotent); see the module docstring."""
    if is_patched(WSStream._handle_events, _MARKER):
        return
    patch_method(WSStream, "_handle_events", _handle_events, marker=_MARKER)
