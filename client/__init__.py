"""The kvstore Python client (being written: see issue 4)."""
