"""LM Studio's SDK protocol: the websockets that ``lmstudio`` (Python), ``@lmstudio/sdk`` and ``lms`` use.

The subset the real ``lmstudio`` SDK needs for model management, predictions and embeddings; see
docs/simulator.md ("The SDK protocol") for the list and its limits.

* :mod:`.session`: handshake, auth packet, RPC and channel multiplexing on one socket;
* :mod:`.loading`: ``getOrLoad``, ``loadModel``, ``unloadModel``, listings, model info;
* :mod:`.predict`: the ``predict`` channel and ``embedString``;
* :mod:`.wire`: descriptors, KV configs and error objects in the SDK's shapes.
"""

from __future__ import annotations

from gateway.simulator.context import SimContext
from gateway.simulator.sdk import loading, predict
from gateway.simulator.sdk.session import ChannelHandler, RpcHandler, SdkServer

_MODEL_RPCS: dict[str, RpcHandler] = {
    "listLoaded": loading.list_loaded,
    "unloadModel": loading.unload_model,
    "getModelInfo": loading.get_model_info,
    "getLoadConfig": loading.get_load_config,
    "tokenize": predict.tokenize,
    "countTokens": predict.count_tokens,
}
_MODEL_CHANNELS: dict[str, ChannelHandler] = {
    "getOrLoad": loading.get_or_load,
    "loadModel": loading.load_model,
}

RPCS: dict[tuple[str, str], RpcHandler] = {
    **{("llm", name): handler for name, handler in _MODEL_RPCS.items()},
    **{("embedding", name): handler for name, handler in _MODEL_RPCS.items()},
    ("embedding", "embedString"): predict.embed_string,
    ("system", "listDownloadedModels"): loading.list_downloaded,
}
CHANNELS: dict[tuple[str, str], ChannelHandler] = {
    **{("llm", name): handler for name, handler in _MODEL_CHANNELS.items()},
    **{("embedding", name): handler for name, handler in _MODEL_CHANNELS.items()},
    ("llm", "predict"): predict.predict,
}


def sdk_server(ctx: SimContext) -> SdkServer:
    """The ASGI app for the simulator's ``websocket`` scopes."""
    return SdkServer(ctx, RPCS, CHANNELS)


__all__ = ["CHANNELS", "RPCS", "SdkServer", "sdk_server"]
