"""KV block bookkeeping in plain Python: no torch import, so its tests run in milliseconds."""
