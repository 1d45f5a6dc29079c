"""Dotted overrides that shrink the quickstart models for tests and smoke jobs on 32-px images:
a 1-layer ViT and a 1-layer BERT of width 32 (``TINY_TOWERS``; the embedding size stays the
caller's ``model.embed_dim``) and a 1-layer slow model of width 32 (``TINY_SLOW``).
``HF_TOWERS`` switches the quickstart's CNN + frozen MiniLM towers to ``transformers`` towers
built from ``hf_config`` (random init, mean-pooled text), which the other overrides then size."""

HF_TOWERS = ["model.image.kind=hf_config", "model.image.pool=auto", "model.text.kind=hf_config",
             "model.text.freeze=false", "model.text.pool=auto"]
TINY_TOWERS = [
    *HF_TOWERS,
    ("model.image.hf_config={model_type: vit, image_size: 32, patch_size: 8, hidden_size: 32,"
     " num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}"),
    ("model.text.hf_config={model_type: bert, vocab_size: 30522, hidden_size: 32,"
     " num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64,"
     " max_position_embeddings: 32}"),
]
TINY_SLOW = ["slow.width=32", "slow.heads=2", "slow.decoder_layers=1"]
