"""Several upstreams: each request goes to where its model is warm (docs/upstreams.md).

* :mod:`gateway.upstreams.upstream`: :class:`Upstream`, one server and what lmgate keeps for it
  (its pooled client, model service and proxy), built from one entry of ``upstreams:``;
* :mod:`gateway.upstreams.choice`: the routing rules as a pure function over what each upstream
  is doing now;
* :mod:`gateway.upstreams.router`: :class:`Router`, the ASGI app that applies them, hands the
  request to the chosen upstream's own layers, and fails over before the first byte;
* :mod:`gateway.upstreams.lists`: the model lists of every upstream merged into one.
"""

from gateway.upstreams.upstream import Upstream, build_upstreams

__all__ = ["Upstream", "build_upstreams"]
