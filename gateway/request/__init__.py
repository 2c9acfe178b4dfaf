"""What comes in: the request target made canonical (``paths``), the routes lmgate forwards, where
to and as what kind of request (``routes``), and what it refuses before any layer contacts the
upstream (``validation``)."""
