"""lmgate's own surface beside the forwarded routes: health, readiness and admin routes
(``routes``), the status page (``status``) and lmgate's OpenAPI description (``openapi``). They read
the gateway through ``view.GatewayView`` (plain data, read-only) and import nothing that builds it."""
