"""How Python functions become handlers: ``@poolport.handler`` settings and
per-worker state (``handler``), annotated arguments and results (``typed``)."""
