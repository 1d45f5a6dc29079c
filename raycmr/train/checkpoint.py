"""The DeepSpeed part of a checkpoint directory: ``ds/`` (engine state of every rank, tag ``ds``).

The rest of the directory (``model.pt``, ``config.yaml``, ``state.json``: the DeepSpeed-free
export) is written and read by :mod:`raycmr.artifacts`.
"""

DS_DIR, DS_TAG = "ds", "ds"
