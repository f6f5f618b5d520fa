"""``kvstore demo``: the multi-turn demo on a small model (``python -m kvstore.demo``)."""
