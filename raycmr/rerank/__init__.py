"""The one-vector cross-attention reranker's training (the model is
:mod:`raycmr.models.reranker`): fitting on in-memory pairs (``fit``), pairs from a checkpoint's
shards and the held-out report (``train``), and the ``raycmr reranker`` command (``cli``)."""
