"""lmgate's own surface beside the forwarded routes: health, readiness and admin routes
(``routes``), the status page (``status``) and lmgate's OpenAPI description (``openapi``)."""
