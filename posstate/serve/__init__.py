"""A read-only view of the state over HTTP and WebSocket, Prometheus metrics and a status page (docs/SERVE.md).

Only :mod:`posstate.serve.shapes` (the JSON shapes the CLI shares) is imported without the ``serve`` extra;
the server modules import starlette, uvicorn and prometheus-client.
"""
