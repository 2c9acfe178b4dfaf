"""Cold starts: what lmgate knows about the upstream's models, and how it loads and warms them.

* ``registry``: each model's state (the upstream's listing plus lmgate's own observations);
* ``upstream``: LM Studio's model APIs (``/api/v1``, ``/api/v0``, or the OpenAI ``/v1/models``);
* ``loader``: single-flight loads, ``max_concurrent_loads`` at a time, each within a timeout;
* ``coldstart``: the request layer that loads before forwarding, and the heartbeat text;
* ``warm``: preload, keep-warm and the periodic refresh;
* ``admin``: ``/lmgate/models``;
* ``service``: ``ModelService``, all of it for one upstream, built from the ``models:`` config.

See docs/cold-starts.md.
"""

from gateway.models.service import ModelService

__all__ = ["ModelService"]
