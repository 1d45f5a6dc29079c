"""Shards and the Ray Data pipeline (the only place that builds Ray Data pipelines).

- ``paths``: shard path arguments (files, dirs, globs; local, s3://, gs://) -> files
- ``schema``: shard columns and the driver-side check (``ShardSchemaError``, ``ShardReadError``)
- ``writers``: rolling Parquet ``ShardWriter``; folder-of-images and Wikipedia-features writers
- ``synthetic``: procedural shape images with attribute captions
- ``cli``: the ``raycmr shards`` command
- ``text``: tokenizers; ``transforms``: per-batch decode/augment/tokenize (no Ray)
- ``pipeline``: ``build_dataset``, ``iter_worker_batches``, ``count_rows``, ``load_tokenizer``
- ``inference``: Ray Data batch inference with any callable model (``run_batch_inference``)
"""
