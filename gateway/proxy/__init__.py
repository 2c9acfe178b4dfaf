"""To the upstream and back: the terminal app (``relay.Proxy``), the headers it forwards
(``headers``), SSE framing (``sse``), answers assembled from streams (``assemble``, ``usage``) and
the guarded HTTP transport under httpx (``transport``)."""
