"""The node's ASGI app: one module per protocol, no model logic in routes."""
