"""Index build + the Serve application, end to end over real HTTP.

A tiny feature-tower dual encoder (untrained MLPs) and a 24-image feature gallery (36 rows:
12 images with two captions sharing an image_id) go through `raycmr index` (Ray Data batch
inference) and the Serve app; every answer is checked against a NumPy brute-force top-k of the
model's own embeddings. A feature gallery has no slow stage (the slow model reads pixels and
captions): the slow stage served over an image gallery is tests/test_serve_slow.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import running_app

from raycmr.artifacts import write_export
from raycmr.config import ConfigError, ServeConfig, config_from_dict, with_overrides
from raycmr.data.schema import feature_shard_schema
from raycmr.index.faiss_index import build_index, save_index
from raycmr.models.dual_encoder import DualEncoder

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, N_PAIRED, IMAGE_DIM, TEXT_DIM = 24, 12, 16, 8
TOP_K = 24
TOKEN = "test-token-0123456789abcdef"


def _mix() -> np.ndarray:
    return np.random.default_rng(123).standard_normal((IMAGE_DIM, TEXT_DIM)).astype(np.float32)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(text_feat, image_feat)``: the text is a fixed linear view of its image plus noise."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, IMAGE_DIM)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((n, TEXT_DIM)).astype(np.float32)
    return image @ _mix() / 4 + noise, image


def model_config(gallery: str = "", **model: object):
    return config_from_dict({
        "data": {"kind": "features", "test": [gallery] if gallery else []},
        "model": {"embed_dim": 8,
                  "image": {"kind": "mlp", "input_dim": IMAGE_DIM, "hidden_dims": [16]},
                  "text": {"kind": "mlp", "input_dim": TEXT_DIM, "hidden_dims": [16]},
                  **model},
        "index": {"kind": "flat"},
    })


def write_gallery(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A feature shard; returns (image id per image, image_feat [24, 16], one query per image)."""
    text, image = synthetic(N_IMAGES, seed=7)
    text2, _ = synthetic(N_IMAGES, seed=8)
    names, rows = [], []
    for i in range(N_IMAGES):
        if i < N_PAIRED:  # two captions of one image: one gallery entry, named by image_id
            name = f"img{i:02d}"
            rows.append((f"r{i}a", image[i], text[i], name))
            rows.append((f"r{i}b", image[i], text2[i], name))
        else:  # no image_id: the entry is named by the row id
            name = f"solo{i:02d}"
            rows.append((name, image[i], text[i], None))
        names.append(name)
    order = np.random.default_rng(0).permutation(len(rows))  # shard order != id order
    rows = [rows[j] for j in order]
    table = pa.table({
        "id": [r[0] for r in rows],
        "image_feat": [r[1].tolist() for r in rows],
        "text_feat": [r[2].tolist() for r in rows],
        "image_id": [r[3] for r in rows],
    }, schema=feature_shard_schema(["image_id"]))
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-0.parquet")
    return names, image, text


def write_checkpoint(path: Path, gallery: str, **model: object) -> DualEncoder:
    cfg = model_config(gallery, **model)
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    path.mkdir(parents=True)
    write_export(path, model.state_dict(), cfg, {"epoch": 0})
    return model


# ------------------------------------------------------------------------ without a cluster


def test_merge_stages() -> None:
    """The head is re-ranked by h + beta * fast (ties in retrieval order), the rest keep the
    retrieval order; every hit carries its fast, slow and final score."""
    from raycmr.serve.scoring import merge_stages

    hits = [(5, "a", 0.9), (2, "b", 0.8), (7, "c", 0.7), (1, "d", 0.6)]
    out = merge_stages(hits, [0.1, 0.5, 0.3], k=4)
    assert [(r["id"], r["stage"]) for r in out] == [("b", "rerank"), ("c", "rerank"),
                                                    ("a", "rerank"), ("d", "retrieve")]
    assert [r["score"] for r in out] == pytest.approx([0.5, 0.3, 0.1, 0.6])
    assert [r["slow_score"] for r in out[:3]] == pytest.approx([0.5, 0.3, 0.1])
    assert out[3]["slow_score"] is None
    assert [r["fast_score"] for r in out] == pytest.approx([0.8, 0.7, 0.9, 0.6])
    assert [r["fast_rank"] for r in out] == [2, 3, 1, 4]
    assert [r["id"] for r in merge_stages(hits, None, k=2)] == ["a", "b"]
    assert [r["id"] for r in merge_stages(hits, [0.2, 0.2], k=3)] == ["a", "b", "c"]  # stable
    # beta 2: h + 2 * fast = 1.9, 2.1, 1.7 -> b, a, c, then d
    out = merge_stages(hits, [0.1, 0.5, 0.3], k=4, beta=2.0)
    assert [r["id"] for r in out] == ["b", "a", "c", "d"]
    assert [r["score"] for r in out] == pytest.approx([2.1, 1.9, 1.7, 0.6])
    assert [r["slow_score"] for r in out[:3]] == pytest.approx([0.5, 0.1, 0.3])


def test_build_app_rejects_bad_paths(tmp_path) -> None:
    from raycmr.serve.app import build_app
    from raycmr.serve.plan import plan_app

    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, "")
    index = tmp_path / "index"
    save_index(build_index(np.eye(8, dtype=np.float32)), [str(i) for i in range(8)], index)
    (index / "gallery.json").write_text(json.dumps({"data_kind": "features"}))
    ok = {"checkpoint": str(ckpt), "index_path": str(index), "auth": "none"}
    plan = plan_app(ok)
    assert (plan.query_input, plan.text_dim, plan.slow_checkpoint, plan.count) == (
        "text_feat", 8, "", 8)
    assert (plan.rerank_k, plan.max_rerank_k) == (0, 0) and "features gallery" in plan.slow_note
    assert not plan.has_images  # a feature gallery: no thumbnails, no image -> text
    gallery = json.loads((index / "gallery.json").read_text())
    (index / "gallery.json").write_text(json.dumps({**gallery, "data_kind": "images",
                                                    "shards": [str(tmp_path / "moved")]}))
    moved = plan_app(ok)  # shards gone: search still served, the page's images off, said why
    assert not moved.has_images and "moved" in moved.gallery_note
    (index / "gallery.json").write_text(json.dumps(gallery))

    with pytest.raises(ConfigError, match="checkpoint '.*nope' does not exist"):
        build_app({**ok, "checkpoint": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="index directory '.*nope' does not exist"):
        build_app({**ok, "index_path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="unknown serve arg"):
        build_app({**ok, "topk": 3})
    with pytest.raises(ConfigError, match="rerank_k"):
        build_app({**ok, "top_k": 5, "rerank_k": 6})
    with pytest.raises(ConfigError, match="serve arg 'reranker' is gone .*raycmr index --slow"):
        build_app({**ok, "reranker": str(tmp_path / "rr")})
    with pytest.raises(ConfigError, match="is a features gallery: the slow model reads images"):
        build_app({**ok, "slow_checkpoint": str(ckpt)})
    (index / "gallery.json").write_text(json.dumps({"data_kind": "images"}))
    with pytest.raises(ConfigError, match="stores no phi\\(x\\) for the slow stage; build the "
                                          "index with `raycmr index --checkpoint .* --slow SLOW"):
        build_app({**ok, "slow_checkpoint": str(ckpt)})
    assert "stores no phi(x): no slow stage" in plan_app(ok).slow_note  # served fast only
    (index / "gallery.json").write_text(json.dumps({"data_kind": "features"}))
    save_index(build_index(np.eye(4, dtype=np.float32)), list("abcd"), index)
    with pytest.raises(ConfigError, match="holds 4-d vectors but checkpoint .* embeds to 8-d"):
        build_app(ok)
    (index / "ids.parquet").unlink()
    with pytest.raises(ConfigError, match="missing ids.parquet; build one with `raycmr index"):
        build_app(ok)


def test_text_queries_encode_and_rerank_in_batches() -> None:
    """The text path (tokenizer + HF text tower, the slow model over stored phi(x)) without a
    cluster: a batch of ragged requests gives what each query computed alone gives."""
    from raycmr.data.text import load_text_encoder
    from raycmr.models.slow import build_slow_model
    from raycmr.serve.scoring import encode_queries, slow_scores

    cfg = config_from_dict({
        "data": {"kind": "images", "tokenizer": "minilm", "max_text_len": 12},
        "model": {"embed_dim": 8,
                  "image": {"kind": "mlp", "input_dim": IMAGE_DIM, "hidden_dims": [16]},
                  "text": {"kind": "hf_config", "hf_config": {
                      "model_type": "bert", "vocab_size": 30522, "hidden_size": 16,
                      "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 32, "max_position_embeddings": 16}}},
    })
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    tokenize = load_text_encoder("minilm")
    queries = [{"text": "a red circle on the left"}, {"text": "two blue squares"},
               {"text": "a small green triangle above a large yellow star"}]
    batch = encode_queries(model, queries, tokenize, 12)
    for i, q in enumerate(queries):
        ids, mask = tokenize([q["text"]], 12)
        with torch.no_grad():
            alone = model.encode_text({"input_ids": torch.from_numpy(ids),
                                       "attention_mask": torch.from_numpy(mask)})
        np.testing.assert_allclose(batch[i], alone[0].numpy(), atol=1e-5)

    from raycmr.config import SlowConfig

    slow = build_slow_model(SlowConfig(width=16, heads=2, decoder_layers=1),
                            torch.arange(1000, 3000), 32, 12).eval()
    phi = np.random.default_rng(0).standard_normal((10, 16, 16)).astype(np.float16)
    rows = [[3, 1, 4], [], [9, 2, 6, 5, 0]]
    got = slow_scores(slow, lambda r: phi[r], queries, rows, tokenize, 12)
    assert [len(g) for g in got] == [3, 0, 5]
    for q, rr, scores in zip(queries, rows, got):
        if not rr:
            continue
        ids, mask = tokenize([q["text"]], 12)
        alone = slow.score_candidates(torch.from_numpy(phi[rr]).float(), torch.from_numpy(ids),
                                      torch.from_numpy(mask))[0]
        np.testing.assert_allclose(scores, alone.numpy(), atol=1e-4)
    assert np.ptp(got[2]) > 0  # the candidates' tokens change the score


def test_serve_config_file_matches_the_builder() -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text())
    parse = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    (app,) = parse(doc).applications
    assert app.import_path == "raycmr.serve.app:build_app"
    assert {"index_path", "checkpoint"} <= set(app.args)
    assert set(app.args) <= set(ServeConfig.__dataclass_fields__)
    names = {d.name for d in app.deployments}
    assert names <= {"Ingress", "QueryEncoder", "Retriever", "SlowScorer", "Gallery"}
    # safe by default: local only, token on, no /docs; replica loss survived
    from raycmr.serve.plan import serve_config

    cfg = serve_config(app.args)
    assert doc["http_options"]["host"] == "127.0.0.1" == ServeConfig().host
    assert (cfg.auth, cfg.docs, cfg.replicas) == ("token", False, 2)
    scaling = {d.name: d.autoscaling_config for d in app.deployments}
    for name in ("Ingress", "QueryEncoder"):
        assert scaling[name]["min_replicas"] >= 2 < scaling[name]["max_replicas"], name


@pytest.mark.ray
def test_label_space_index_ranks_by_probability_of_same_class(ray_cluster, tmp_path) -> None:
    """A checkpoint with ``retrieval_space: label``: `raycmr index` stores 5-d label-space
    vectors (3 classes + 2), the serve app accepts that index (and refuses a common-space one),
    and the served query vectors rank the gallery by sum_c p(c|query) p(c|image)."""
    from raycmr.index.faiss_index import load_index, search
    from raycmr.index.gallery import build_gallery_index
    from raycmr.serve.app import build_app
    from raycmr.serve.plan import plan_app
    from raycmr.serve.scoring import encode_queries

    names, image, queries = write_gallery(tmp_path / "gallery")
    label = {"num_classes": 3, "retrieval_space": "label", "label_temperature": 0.5}
    model = write_checkpoint(tmp_path / "ckpt", str(tmp_path / "gallery"), **label)
    build_gallery_index(str(tmp_path / "ckpt"), "test", tmp_path / "index", num_actors=1,
                        batch_size=16)
    index, ids = load_index(tmp_path / "index")
    assert index.d == 5 and index.ntotal == N_IMAGES
    assert plan_app({"checkpoint": str(tmp_path / "ckpt"), "index_path": str(tmp_path / "index"),
                     "auth": "none"}).count == N_IMAGES
    with pytest.raises(ConfigError, match="holds 5-d vectors but checkpoint .* embeds to 8-d"):
        write_checkpoint(tmp_path / "common", str(tmp_path / "gallery"))
        build_app({"checkpoint": str(tmp_path / "common"), "index_path": str(tmp_path / "index"),
                   "auth": "none"})

    pos = {n: i for i, n in enumerate(names)}
    gallery = torch.from_numpy(image[[pos[n] for n in ids]])
    query = encode_queries(model, [{"text_feat": q.tolist()} for q in queries], None, 0)
    found_scores, found_ids = search(index, query, 5)
    with torch.no_grad():
        p_img = torch.softmax(model.classifier(model.encode_image({"image_feat": gallery})) / 0.5,
                              -1).double().numpy()
        p_txt = torch.softmax(model.classifier(
            model.encode_text({"text_feat": torch.from_numpy(queries)})) / 0.5, -1).double().numpy()
    same_class = p_txt @ p_img.T
    np.testing.assert_allclose(found_scores, np.sort(same_class, axis=1)[:, ::-1][:, :5],
                               atol=1e-5)
    picked = np.take_along_axis(same_class, found_ids, axis=1)
    np.testing.assert_allclose(picked, found_scores, atol=1e-5)


def write_pairs(path: Path, n: int, seed: int) -> None:
    """A feature shard of ``n`` synthetic pairs, one image per pair."""
    text, image = synthetic(n, seed)
    path.mkdir(parents=True)
    pq.write_table(pa.table({"id": [f"{path.name}{i}" for i in range(n)],
                             "image_feat": image.tolist(), "text_feat": text.tolist()},
                            schema=feature_shard_schema([])), path / "part-0.parquet")


@pytest.mark.ray
def test_teacher_command_fits_the_feature_teacher(ray_cluster, tmp_path) -> None:
    """`raycmr teacher` (feature checkpoints: the distillation teacher) fits on the
    checkpoint's train split (pairs decoded and embedded by Ray Data) and beats the (untrained)
    dual encoder's R@1 on held-out pairs by a wide margin; the Serve app does not use it."""
    from raycmr.artifacts import load_feature_teacher
    from raycmr.cli import main

    write_pairs(tmp_path / "train", 800, seed=11)
    write_pairs(tmp_path / "val", 200, seed=12)
    cfg = with_overrides(model_config(str(tmp_path / "val")),
                         {"data.train": [str(tmp_path / "train")],
                          "data.val": [str(tmp_path / "val")]})
    torch.manual_seed(0)
    (tmp_path / "ckpt").mkdir()
    write_export(tmp_path / "ckpt", DualEncoder(cfg.model).state_dict(), cfg, {"epoch": 0})

    from raycmr.teacher.train import train_teacher

    report = train_teacher(str(tmp_path / "ckpt"), tmp_path / "teacher", steps=300,
                           batch_size=32, lr=1e-2, width=16, heads=2, num_actors=1)
    assert report["pairs"] == 800 and report["eval_pairs"] == 200 and report["candidates"] == 100
    assert report["last_loss"] < report["first_loss"] - 1.0
    # chance is 1% among 100 images; the untrained dual encoder is near it
    assert report["teacher_r1"] > 30 and report["teacher_r1"] > report["fast_r1"] + 20, report
    teacher = load_feature_teacher(tmp_path / "teacher")
    assert (teacher.cfg.query, teacher.cfg.text_dim, teacher.cfg.image_dim) == (
        "features", TEXT_DIM, IMAGE_DIM)
    # the command line: a split that does not exist is named, exit status 2, nothing written
    assert main(["teacher", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "t2"), "--split", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "t2").exists()


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """Checkpoint, gallery, index and a running app (fast stage only) on a free port."""
    from raycmr.index.gallery import build_gallery_index

    tmp = tmp_path_factory.mktemp("serve")
    names, image, queries = write_gallery(tmp / "gallery")
    model = write_checkpoint(tmp / "ckpt", str(tmp / "gallery"))
    record = build_gallery_index(str(tmp / "ckpt"), "test", tmp / "index", num_actors=1,
                                 batch_size=16)

    args = {"checkpoint": str(tmp / "ckpt"), "index_path": str(tmp / "index"), "top_k": TOP_K,
            "max_batch_size": 8, "batch_wait_timeout_s": 0.1, "replicas": 1, "max_replicas": 1,
            "max_query_chars": 50, "max_body_bytes": 20_000}
    with running_app(tmp, TOKEN, args) as (args, client, url, headers):
        yield {"tmp": tmp, "names": names, "image": image, "queries": queries, "model": model,
               "record": record, "client": client, "url": url, "headers": headers, "args": args}


def _expected_retrieval(served, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy brute force over the model's own embeddings: (ids [Q, k], scores [Q, k])."""
    model, names = served["model"], np.array(sorted(served["names"]))
    pos = {n: i for i, n in enumerate(served["names"])}
    image = served["image"][[pos[n] for n in names]]
    with torch.no_grad():
        g = model.encode_image({"image_feat": torch.from_numpy(image)}).double().numpy()
        q = model.encode_text({"text_feat": torch.from_numpy(served["queries"])}).double().numpy()
    sim = q @ g.T
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return names[top], np.take_along_axis(sim, top, axis=1)


def _search_all(served, **body) -> list[list[dict]]:
    """POST one /search per gallery image's query, all at once; the JSON answers in order."""
    import httpx

    async def fire():
        async with httpx.AsyncClient(base_url=served["url"], timeout=120,
                                     headers=served["headers"]) as client:
            return await asyncio.gather(*[
                client.post("/search", json={"text_feat": q.tolist(), **body})
                for q in served["queries"]
            ])

    answers = asyncio.run(fire())
    for r in answers:
        assert r.status_code == 200, r.text
    return [r.json() for r in answers]


@pytest.mark.ray
def test_index_has_one_entry_per_image(served) -> None:
    from raycmr.index.faiss_index import load_index

    index_dir = served["tmp"] / "index"
    index, ids = load_index(index_dir)
    assert ids == sorted(served["names"]) and index.ntotal == N_IMAGES
    assert served["record"]["count"] == N_IMAGES and served["record"]["pairs"] == 36
    assert "phi" not in served["record"] and not (index_dir / "phi").exists()
    health = served["client"].get("/healthz").json()
    assert health == {"status": "ok", "gallery": N_IMAGES, "index_kind": "flat",
                      "query_input": "text_feat", "top_k": TOP_K, "rerank_k": 0,
                      "max_rerank_k": 0, "beta": 0.0, "slow": False}


@pytest.mark.ray
def test_retrieve_stage_equals_brute_force(served) -> None:
    ids, scores = _expected_retrieval(served, 10)
    for i, got in enumerate(_search_all(served, k=10, rerank=False)):
        assert [r["id"] for r in got] == ids[i].tolist()
        assert {r["stage"] for r in got} == {"retrieve"}
        np.testing.assert_allclose([r["score"] for r in got], scores[i], atol=1e-5)


@pytest.mark.ray
def test_concurrent_requests_are_batched_and_correct(served) -> None:
    ids, _ = _expected_retrieval(served, 5)
    before = served["client"].get("/stats").json()
    for i, got in enumerate(_search_all(served, k=5)):  # 24 requests in flight at once
        assert [r["id"] for r in got] == ids[i].tolist()
    after = served["client"].get("/stats").json()
    assert "slow" not in after and "rerank" not in after["stages"]
    assert after["stages"]["retrieve"]["searches"] >= N_IMAGES
    for stage in ("encoder", "retriever"):
        assert after[stage]["requests"] - before[stage]["requests"] == N_IMAGES, stage
        assert after[stage]["max_batch"] > 1, after  # concurrent queries shared a forward pass
    print("batch sizes:", {k: after[k]["sizes"] for k in ("encoder", "retriever")})


@pytest.mark.ray
@pytest.mark.parametrize("body,status,needle", [
    ({"text": "a cat"}, 400, "takes feature vectors"),
    ({"text_feat": [0.0] * 3}, 400, "has 3 values; this model takes 8"),
    ({"text": "a", "text_feat": [0.0] * 8}, 400, "exactly one"),
    ({"text_feat": [0.0] * 8, "k": TOP_K + 1}, 400, "more than this service's top_k"),
    ({"text_feat": [0.0] * 8, "k": 0}, 422, "greater than or equal to 1"),
    ({"text_feat": [0.0] * 8, "rerank_k": 5}, 400, "this service has no slow stage"),
])
def test_bad_requests_get_clear_errors(served, body, status, needle) -> None:
    r = served["client"].post("/search", json=body)
    assert r.status_code == status
    assert needle in r.text


@pytest.mark.ray
def test_token_limits_and_docs(served) -> None:
    """Every route but /healthz needs the bearer token (none: 401, wrong: 403); oversized
    bodies get 413, overlong text queries 422; /docs is off by default."""
    import httpx

    url, query = served["url"], {"text_feat": served["queries"][0].tolist(), "k": 3}
    expected, _ = _expected_retrieval(served, 3)
    assert httpx.get(f"{url}/healthz").status_code == 200
    for method, path, body in [("POST", "/search", query), ("GET", "/stats", None),
                               ("GET", "/image/img00", None),
                               ("POST", "/search/image", None)]:
        kwargs = {"json": body} if body is not None else {}
        none = httpx.request(method, url + path, **kwargs)
        assert none.status_code == 401, (path, none.text)
        assert none.headers["www-authenticate"] == "Bearer"
        wrong = httpx.request(method, url + path, headers={"Authorization": "Bearer nope"},
                              **kwargs)
        assert wrong.status_code == 403, (path, wrong.text)
    page = httpx.get(url + "/")  # the page answers 401 with its login form
    assert page.status_code == 401 and 'id="login-form"' in page.text
    assert httpx.post(url + "/login", json={"token": "nope"}).status_code == 403
    login = httpx.post(url + "/login", json={"token": TOKEN})
    assert login.status_code == 204
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    with httpx.Client(base_url=url, cookies=login.cookies) as browser:  # the cookie works alike
        assert browser.get("/").status_code == 200
        got = browser.post("/search", json=query)
        assert got.status_code == 200
    right = served["client"].post("/search", json=query)
    assert [r["id"] for r in right.json()] == [r["id"] for r in got.json()]
    assert [r["id"] for r in right.json()] == expected[0].tolist()
    stages = [part.split(";")[0] for part in right.headers["server-timing"].split(", ")]
    assert stages == ["encode", "retrieve"]

    client = served["client"]
    big = client.post("/search", content=b"x" * 30_000,
                      headers={"content-type": "application/json"})
    assert big.status_code == 413 and "max_body_bytes" in big.text
    long = client.post("/search", json={"text": "a" * 51, "k": 3})
    assert long.status_code == 422 and "at most 50" in long.text
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404


@pytest.mark.ray
def test_replica_loss_under_load_is_survived(served) -> None:
    """2 replicas of every deployment; 8 clients for 16 s while one replica of each deployment
    is killed in turn: every search whose downstream replica died is retried on the other one,
    so only requests that were inside the killed Ingress itself can fail (fewer than 8)."""
    from ray import serve

    from raycmr.serve.app import APP_NAME, build_app
    from raycmr.serve.loadtest import replica_actor_names, run_load

    serve.run(build_app({**served["args"], "replicas": 2, "max_replicas": 2}), name=APP_NAME,
              route_prefix="/")
    deployments = ("QueryEncoder", "Retriever", "Ingress")
    assert all(len(replica_actor_names(APP_NAME, d)) == 2 for d in deployments)
    bodies = [{"text_feat": q.tolist(), "k": 5} for q in served["queries"]]
    report = run_load(served["url"], bodies, headers=served["headers"], clients=8,
                      duration_s=16, kills=[(APP_NAME, d) for d in deployments])
    summary = report.summary()
    print("replica-kill load:", summary)
    assert len(report.killed) == 3 and report.requests > 40, summary
    after = report.failures_after()
    downstream = sum(n for name, n in after.items() if "#Ingress#" not in name)
    assert downstream == 0, summary  # retried: no failure from a dead encoder/retriever
    assert report.failures < 8, summary  # at most the requests in flight in the killed Ingress
    # the answers after the kills are still the brute-force ones
    ids, _ = _expected_retrieval(served, 5)
    got = served["client"].post("/search", json={**bodies[0], "rerank": False}).json()
    assert [r["id"] for r in got] == ids[0].tolist()
    # /stats is app-wide: whichever Ingress replica answers, the same record of every search
    counts = {served["client"].get("/stats").json()["stages"]["total"]["searches"]
              for _ in range(8)}
    assert len(counts) == 1, counts
    assert counts.pop() >= min(report.requests - report.failures, 2000), summary


def test_plan_reads_the_token_from_env_or_file(tmp_path) -> None:
    """Auth is on unless turned off: the token comes from the named environment variable, else
    the file; none, an empty file or a short token is a one-line ConfigError; replicas keep only
    the token's SHA-256."""
    import hashlib

    from raycmr.serve.plan import read_token, serve_config, token_digest

    cfg = serve_config({"token_env": "T"})
    assert read_token(cfg, {"T": " " + TOKEN + "\n"}) == TOKEN
    (tmp_path / "tok").write_text(TOKEN + "\n")
    from_file = serve_config({"token_env": "T", "token_file": str(tmp_path / "tok")})
    assert read_token(from_file, {}) == TOKEN
    assert read_token(from_file, {"T": "x" * 20}) == "x" * 20  # the environment wins
    assert read_token(serve_config({"auth": "none"}), {}) == ""
    with pytest.raises(ConfigError, match="no token was given: set the environment variable T "
                                          "or serve token_file, or auth=none"):
        read_token(cfg, {})
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_token(cfg, {"T": "short"})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="token_file '.*empty' is empty"):
        read_token(serve_config({"token_file": str(tmp_path / "empty"), "token_env": ""}), {})
    with pytest.raises(ConfigError, match="serve.auth' is 'off'; choose one of token, none"):
        serve_config({"auth": "off"})
    with pytest.raises(ConfigError, match="serve.max_replicas \\(1\\) must be >= serve.replicas"):
        serve_config({"replicas": 2, "max_replicas": 1})
    assert token_digest(TOKEN) == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert token_digest("") == ""
