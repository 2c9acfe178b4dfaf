"""Composable pure-ASGI middlewares for LLM traffic.

Each works alone around any ASGI app (Starlette, FastAPI, plain ASGI) and takes plain keyword
arguments; none imports YAML, pydantic or ``gateway``.
"""

from middleware.errors import ErrorMiddleware, LmgateError

__all__ = ["ErrorMiddleware", "LmgateError"]
