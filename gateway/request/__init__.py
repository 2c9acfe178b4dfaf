"""What comes in: the request target made canonical (``paths``), the routes lmgate forwards
(``routes``) and what it refuses before any layer contacts the upstream (``validation``)."""
