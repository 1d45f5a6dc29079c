"""The feature teacher's training (the model is :mod:`raycmr.models.feature_teacher`), the
distillation teacher of feature checkpoints: fitting on in-memory pairs (``fit``), pairs from a
checkpoint's shards and the held-out report (``train``), and the ``raycmr teacher`` command
(``cli``). Image galleries' slow stage is :mod:`raycmr.models.slow`
(``raycmr train --config quickstart_slow``)."""
