"""The parts of the vLLM connector; vLLM loads the class from ``client.vllm_connector``.

Importing this package needs no vLLM; ``client.vllm.metadata`` (and so the scheduler and worker
halves and ``client.vllm_connector``) does, and says so when it is missing.
"""
