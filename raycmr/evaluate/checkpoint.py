"""A checkpoint's retrieval report on a split: embedded by Ray Data batch inference."""

from __future__ import annotations

from raycmr.config import ConfigError


def evaluate_checkpoint(checkpoint: str, split: str | None = None,
                        overrides: list[str] | None = None,
                        num_actors: int = 2,
                        embeddings_out: dict | None = None) -> dict[str, float]:
    """Embed ``split`` ("val" or "test"; None: the checkpoint config's ``eval.split``) of a
    checkpoint's shards with Ray Data actors and compute its retrieval report
    (:func:`raycmr.evaluate.summary.evaluate_embeddings`), plus the minimal-pair group accuracy
    (:func:`raycmr.evaluate.metrics.group_accuracy`) when the shards have a ``group`` column.
    Dotted ``overrides`` apply to the checkpoint's config (e.g. ``data.test=[other/test]``)."""
    from raycmr.artifacts import load_exported
    from raycmr.config import apply_overrides
    from raycmr.evaluate.embedding import embed_split
    from raycmr.evaluate.metrics import group_accuracy
    from raycmr.evaluate.summary import evaluate_embeddings
    from raycmr.runtime import init_ray

    model, cfg = load_exported(checkpoint)
    cfg = apply_overrides(cfg, overrides or [])
    split = split or cfg.eval.split
    paths = cfg.data.test if split == "test" else cfg.data.val
    if not paths:
        raise ConfigError(f"the checkpoint's config has no data.{split} shards: "
                          f"pass data.{split}=[PATH]")
    init_ray(min_cpus=num_actors + 1)
    minimal_pairs = has_minimal_pairs(paths, cfg)
    keep = ("pair_group", "pair_swap") if minimal_pairs else ()
    emb = embed_split(paths, cfg, model.state_dict(), num_actors=num_actors, keep=keep)
    if embeddings_out is not None:  # the embeddings themselves, e.g. for plots
        embeddings_out.update(emb)
    metrics = evaluate_embeddings(emb)
    if minimal_pairs:
        metrics.update(group_accuracy(emb["img"], emb["txt"], emb["group"], emb["pair_group"],
                                      emb["pair_swap"]))
    return metrics


def has_minimal_pairs(paths: list[str], cfg) -> bool:
    """Whether the shards at ``paths`` carry a ``group`` column (minimal pairs: `raycmr shards
    synthetic --minimal-pairs`), whose group accuracy the evaluation then reports."""
    from raycmr.data.schema import check_shards

    return "group" in check_shards(paths, cfg.data.kind, cfg.data.format).columns
