"""To the upstream and back: the terminal app (``relay.Proxy``: exchange and relay), reading the
upstream's body and checking where it ends (``body``), its error answers (``error_bodies``), the
headers it forwards (``headers``), SSE framing (``sse``), answers assembled from streams
(``assemble``), usage asked for and counted (``usage``) and the guarded HTTP transport under httpx
(``transport``)."""
