"""The slow stage served: `raycmr index --slow` stores phi(x), the Serve app re-ranks with the
slow model over real HTTP, and its answers equal the offline `raycmr eval --rerank` ranking.

Tiny models built from configs over a 24-image synthetic gallery with two captions per image: an
untrained ViT/BERT dual encoder, and a captioning slow model fitted for a few seconds to the
gallery's own captions (so that its scores differ by nats, not by float noise, and re-ranking
visibly finds the captioned image). The index goes through a
``file://`` URI (read and written through pyarrow.fs, as object stores are). The offline side is
the function the CLI runs (:func:`raycmr.evaluate.fast_slow.encode_split` + the re-ranking of
:mod:`raycmr.evaluate.slow`), on the same captions, K and beta.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import running_app

from raycmr.artifacts import write_export
from raycmr.config import ConfigError, load_config
from raycmr.configs.tiny import TINY_SLOW, TINY_TOWERS
from raycmr.data.synthetic import write_synthetic_splits
from raycmr.models.dual_encoder import DualEncoder
from raycmr.models.slow import build_slow_model

pytestmark = pytest.mark.ray

N_IMAGES, TOP_K, RERANK_K, MAX_RERANK_K, BETA = 24, 24, 8, 12, 3.0
TOKEN = "test-token-0123456789abcdef"


def configs(shards: Path):
    common = [f"data.train=[{shards}/train]", f"data.val=[{shards}/val]",
              f"data.test=[{shards}/test]", "data.image_size=32", "data.max_text_len=16"]
    fast = load_config("quickstart", common + [
        "model.embed_dim=16",
        *TINY_TOWERS])
    slow = load_config("quickstart_slow", common + TINY_SLOW)
    return fast, slow


def fit_slow(cfg, shard_dir: Path, steps: int = 30):
    """A slow model fitted by its captioning loss to the pairs in ``shard_dir`` (on this
    process: a test fixture, not how raycmr trains it)."""
    from raycmr.data.text import load_text_encoder
    from raycmr.data.transforms import decode_image
    from raycmr.losses.captioning import captioning_loss
    from raycmr.models.slow import caption_vocab

    table = pq.read_table(shard_dir, columns=["image", "caption"]).to_pydict()
    pixels = torch.from_numpy(np.stack([decode_image(b, 32)[0] for b in table["image"]]))
    ids, mask = map(torch.from_numpy, load_text_encoder("minilm")(
        [c.strip() for c in table["caption"]], 16))
    torch.manual_seed(0)
    model = build_slow_model(cfg.slow, caption_vocab(ids, mask), 32, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = captioning_loss(model({"pixel_values": pixels, "input_ids": ids,
                                          "attention_mask": mask}))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """Shards, fast and slow checkpoints, an index with phi(x) and the app on a free port."""
    from raycmr.index.gallery import build_gallery_index

    tmp = tmp_path_factory.mktemp("slowserve")
    shards = tmp / "shards"
    write_synthetic_splits(shards, n_train=4, n_val=4, n_test=N_IMAGES, seed=3, image_size=32,
                           captions_per_image=2, progress=False)
    fast_cfg, slow_cfg = configs(shards)
    torch.manual_seed(0)
    fast = DualEncoder(fast_cfg.model).eval()
    slow = fit_slow(slow_cfg, shards / "test")
    for name, model, cfg in (("fast", fast, fast_cfg), ("slow", slow, slow_cfg)):
        (tmp / name).mkdir()
        write_export(tmp / name, model.state_dict(), cfg, {})
    index = f"file://{tmp / 'index'}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        record = build_gallery_index(str(tmp / "fast"), "test", index, slow=str(tmp / "slow"),
                                     num_actors=1, batch_size=10)

    args = {"checkpoint": str(tmp / "fast"), "index_path": index, "top_k": TOP_K,
            "rerank_k": RERANK_K, "max_rerank_k": MAX_RERANK_K, "beta": BETA,
            "max_batch_size": 8, "batch_wait_timeout_s": 0.1, "replicas": 1, "max_replicas": 1}
    with running_app(tmp, TOKEN, args) as (args, client, url, headers):
        yield {"tmp": tmp, "fast": fast, "slow": slow, "slow_cfg": slow_cfg, "record": record,
               "printed": printed.getvalue(), "client": client, "index": index, "url": url,
               "headers": headers, "args": args}


@pytest.fixture(scope="module")
def offline(served):
    """The test split as `raycmr eval --rerank` lays it out, and queries: captions that occur
    once in the split, with their query row there."""
    from raycmr.data.text import load_text_encoder
    from raycmr.evaluate.fast_slow import encode_split

    with torch.no_grad():
        split = encode_split(served["slow"], served["fast"], served["slow_cfg"], "test")
    table = pq.read_table(served["tmp"] / "shards" / "test", columns=["caption"])
    captions = [c.strip() for c in table.column("caption").to_pylist()]
    unique = [c for c in dict.fromkeys(captions) if captions.count(c) == 1][:6]
    assert len(unique) == 6
    ids, _ = load_text_encoder("minilm")(unique, 16)
    rows = []
    for q in torch.from_numpy(ids):
        (match,) = torch.nonzero((split.input_ids == q).all(1)).flatten().tolist()
        rows.append(match)
    from raycmr.data.transforms import stable_hash63
    from raycmr.index.faiss_index import load_index

    _, names = load_index(served["index"])
    name_of = {stable_hash63(n): n for n in names}
    return {"split": split, "texts": unique, "rows": rows,
            "names": np.array([name_of[int(g)] for g in split.groups])}


def _search(served, bodies: list[dict]) -> list[list[dict]]:
    """POST every body to /search at once; the JSON answers in order."""
    import httpx

    async def fire():
        async with httpx.AsyncClient(base_url=served["url"], timeout=120,
                                     headers=served["headers"]) as client:
            return await asyncio.gather(*[client.post("/search", json=b) for b in bodies])

    answers = asyncio.run(fire())
    for r in answers:
        assert r.status_code == 200, r.text
    return [r.json() for r in answers]


def test_index_stores_phi_of_every_image_in_index_row_order(served) -> None:
    """Row i of the phi store is phi(x) (fp16) of image ids[i], computed here from the shard's
    own image bytes; the printed size is the block files' size."""
    from raycmr.data.transforms import decode_image
    from raycmr.index.faiss_index import load_index
    from raycmr.index.phi_store import PhiStore

    _, ids = load_index(served["index"])
    store = PhiStore(served["index"])
    assert store.shape == (N_IMAGES, 16, 32) and len(ids) == N_IMAGES
    table = pq.read_table(served["tmp"] / "shards" / "test", columns=["image_id", "image"])
    image_of = dict(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
    pixels = torch.from_numpy(np.stack([decode_image(image_of[i], 32)[0] for i in ids]))
    with torch.no_grad():
        want = served["slow"].encode_image(pixels).half().numpy()
    got = store.get(np.arange(N_IMAGES))
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert (got == want).mean() > 0.99  # fp16 of the same float32 tokens (batch kernels aside)
    on_disk = sum(p.stat().st_size for p in (served["tmp"] / "index" / "phi").glob("*.npy")
                  if p.name.startswith("block-"))
    record = served["record"]
    assert record["phi"]["bytes"] == on_disk and record["phi"]["count"] == N_IMAGES
    assert f"images x 16 x 32 float16 = {on_disk / 1e3:.1f} KB" in served["printed"]
    health = served["client"].get("/healthz").json()
    assert (health["rerank_k"], health["max_rerank_k"], health["beta"], health["slow"]) == \
        (RERANK_K, MAX_RERANK_K, BETA, True)


@pytest.mark.parametrize("rerank_k,beta", [(None, None), (MAX_RERANK_K, 0.0), (4, -1.5)])
def test_served_top10_equals_offline_eval_rerank(served, offline, rerank_k, beta) -> None:
    """The service's top 10 (defaults, then per-request K and beta) are the offline fast+slow
    ranking of the same captions; every hit's fast, slow and final scores are the offline ones."""
    from raycmr.evaluate import slow as slow_eval

    k = RERANK_K if rerank_k is None else rerank_k
    b = BETA if beta is None else beta
    split = offline["split"]
    extra = {key: v for key, v in (("rerank_k", rerank_k), ("beta", beta)) if v is not None}
    answers = _search(served, [{"text": t, "k": 10, **extra} for t in offline["texts"]])
    for q, got in zip(offline["rows"], answers):
        queries = slice(q, q + 1)
        want = offline["names"][slow_eval.reranked_rows(served["slow"], split, queries, k, b, 10)[0]]
        assert [hit["id"] for hit in got] == want.tolist()
        fast, top, h, final = slow_eval.rerank_head(served["slow"], split, queries, k, b)
        order = slow_eval.rerank_order(final)[0][:10]
        head = got[:k]
        np.testing.assert_allclose([x["slow_score"] for x in head], h[0][order], atol=1e-3)
        np.testing.assert_allclose([x["fast_score"] for x in head],
                                   fast[0][top[0][order]], atol=1e-4)
        np.testing.assert_allclose([x["score"] for x in head], final[0][order], atol=1e-3)
        assert [x["fast_rank"] for x in head] == (order + 1).tolist()
        assert all(x["stage"] == "rerank" for x in head)
        assert all(x["stage"] == "retrieve" and x["slow_score"] is None for x in got[k:])
        # the target's place in this list is the rank `raycmr eval --rerank` reports
        target = offline["names"][split.target[q]]
        rank = int(slow_eval.rerank_ranks(served["slow"], split.head(q + 1), k, b)[q])
        assert rank > 10 or [x["id"] for x in got].index(target) + 1 == rank


def test_rerank_off_is_the_fast_ranking(served, offline) -> None:
    split = offline["split"]
    answers = _search(served, [{"text": t, "k": 10, "rerank": False} for t in offline["texts"]])
    for q, got in zip(offline["rows"], answers):
        fast = split.fast_txt[q] @ split.fast_img.t()
        want = offline["names"][fast.argsort(descending=True, stable=True)[:10].numpy()]
        assert [x["id"] for x in got] == want.tolist()
        assert {x["stage"] for x in got} == {"retrieve"}


@pytest.mark.parametrize("body,needle", [
    ({"rerank_k": MAX_RERANK_K + 1}, (f"rerank_k={MAX_RERANK_K + 1} is more than this "
                                      f"service's max_rerank_k={MAX_RERANK_K} (serve.")),
    ({"k": TOP_K + 1}, f"more than this service's top_k={TOP_K}"),
])
def test_caps_get_a_400_naming_them(served, body, needle) -> None:
    r = served["client"].post("/search", json={"text": "a red circle", **body})
    assert r.status_code == 400 and needle in r.json()["detail"], r.text


def test_requests_are_batched_and_stats_time_each_stage(served, offline) -> None:
    before = served["client"].get("/stats").json()
    texts = offline["texts"] * 3
    _search(served, [{"text": t, "k": 5} for t in texts])  # 18 requests in flight at once
    after = served["client"].get("/stats").json()
    slow = after["slow"]
    assert slow["requests"] - before["slow"]["requests"] == len(texts)
    assert slow["max_batch"] > 1 and slow["ms_per_batch"] > 0, slow
    stages = after["stages"]
    assert {"encode", "retrieve", "fast", "rerank", "total"} <= set(stages)
    for name, s in stages.items():
        assert s["searches"] >= len(texts) and 0 < s["p50_ms"] <= s["p95_ms"], (name, s)
    assert stages["total"]["mean_ms"] >= stages["rerank"]["mean_ms"]
    print("ms per stage:", {n: round(s["mean_ms"], 1) for n, s in stages.items()},
          "slow scorer batches:", slow["sizes"])


def test_plan_checks_the_slow_checkpoint_against_the_store(served, tmp_path) -> None:
    from raycmr.serve.plan import plan_app

    args = {**served["args"], "auth": "none"}
    plan = plan_app(args)
    assert plan.slow_checkpoint == str(served["tmp"] / "slow") and plan.max_rerank_k == 12
    assert plan_app({**args, "slow_checkpoint": "none"}).rerank_k == 0
    assert plan_app({**args, "max_rerank_k": 100}).max_rerank_k == TOP_K  # never above top_k
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    write_export(other, build_slow_model(served["slow_cfg"].slow, torch.arange(1000, 3000), 32,
                                         16).state_dict(), served["slow_cfg"], {})
    with pytest.raises(ConfigError, match="stores phi\\(x\\) of another slow model"):
        plan_app({**args, "slow_checkpoint": str(other)})
    with pytest.raises(ConfigError, match="is a dual_encoder checkpoint, not a slow model"):
        plan_app({**args, "slow_checkpoint": str(served["tmp"] / "fast")})
    with pytest.raises(ConfigError, match="serve arg 'reranker' is gone"):
        plan_app({**args, "reranker": "x"})
    with pytest.raises(ConfigError, match="rerank_k \\(8\\) must be <= serve.max_rerank_k"):
        plan_app({**args, "max_rerank_k": 4})


def test_teacher_command_refuses_image_checkpoints(served, capsys) -> None:
    """`raycmr teacher` fits the feature-shard teacher only; the retired `raycmr reranker`
    names its replacement; each in one line, exit status 2, nothing written."""
    from raycmr.cli import main

    out = served["tmp"] / "teacher"
    assert main(["teacher", "--checkpoint", str(served["tmp"] / "fast"), "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "feature-shard distillation teacher only" in err and "--config quickstart_slow" in err
    assert main(["reranker", "--checkpoint", str(served["tmp"] / "fast"), "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "`raycmr reranker` is now `raycmr teacher`" in err
    assert not out.exists()
