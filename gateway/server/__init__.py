"""Serving: hypercorn set up for lmgate (``serving``), the connection cap (``connections``) and
``lmgate serve`` with graceful drain (``run``)."""
