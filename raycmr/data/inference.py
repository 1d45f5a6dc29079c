"""Ray Data batch inference with any model: one actor pool maps a dataset through a callable.

The runner knows nothing about models: ``model_factory()`` is called once in every actor and
returns a callable ``batch (dict of numpy arrays) -> dict of numpy arrays``. What a model
computes (e.g. :class:`raycmr.evaluate.embedding.DualEncoderEmbedder`) lives above this layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

BatchFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class _ModelActor:
    """One Ray Data actor holding one model built by the factory."""

    def __init__(self, model_factory: Callable[[], BatchFn]):
        self.fn = model_factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn(batch)


def run_batch_inference(ds: Any, model_factory: Callable[[], BatchFn], columns: tuple[str, ...],
                        *, num_actors: int = 2, batch_size: int = 256,
                        num_cpus: float | None = None,
                        on_rows: Callable[[int], None] | None = None,
                        count_column: str | None = None) -> dict[str, np.ndarray]:
    """Map the Ray Data dataset ``ds`` through ``num_actors`` actors, each holding
    ``model_factory()``, and gather ``columns`` of the outputs on the driver (concatenated in
    the order Ray Data returns them; an empty result has zero-length arrays). ``on_rows(n)``
    is called with the row count of each output batch as it arrives (progress), or with the sum
    of its ``count_column`` (a model that returns one summary row per batch)."""
    import ray

    options = {} if num_cpus is None else {"num_cpus": num_cpus}
    mapped = ds.map_batches(_ModelActor, fn_constructor_args=(model_factory,),
                            batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=max(1, num_actors)), **options)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in columns}
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        for k, chunks in parts.items():
            chunks.append(batch[k])
        if on_rows is not None:
            on_rows(int(batch[count_column].sum()) if count_column else len(batch[columns[0]]))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
