"""Gallery indexes: FAISS build/search/save (``faiss_index``), the gallery of a split embedded by
Ray Data batch inference (``gallery``), and the ``raycmr index`` command (``cli``)."""
