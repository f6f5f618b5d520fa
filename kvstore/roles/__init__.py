"""Disaggregated serving roles: the prefill and decode nodes that hand K/V to each other through
the service (``nodes``) and the prefix-aware router in front of them (``router``)."""
