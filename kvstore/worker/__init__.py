"""The model worker: a transformers causal LM that recomputes holes (``model``) and its link to a
running service (``link``)."""
