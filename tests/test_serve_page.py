"""The search page and the image routes in a real browser (headless Chromium via Playwright).

A tiny random-init image/text dual encoder (ViT + BERT from configs, MiniLM tokenizer) and a
random-init slow model over 16 synthetic shape images (two captions each) are indexed with
`raycmr index --slow` and served with the token on; Chromium signs in through the page's form,
types a caption, and the page must show thumbnails that load, in the order the service's
re-ranked answer has, with each card's slow and final score; with "rerank" unticked, the image a
brute-force ranking of the model's own embeddings puts first comes first. Uploading a gallery
image must list first the caption a brute-force image->text ranking puts first. Also: `raycmr serve` stops on Ctrl-C (SIGINT) with exit status
0 and no traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_hostile_probe import write_tiny_image_app

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "page-test-token-0123456789"
N_IMAGES = 16
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.ray
def test_serve_command_stops_cleanly_on_ctrl_c(page_files) -> None:
    """`raycmr serve` joined to the test cluster: SIGINT -> exit 0, no traceback, app gone.
    (Runs before the module's own app is deployed: both are named raycmr.)"""
    import httpx
    import ray
    from ray import serve

    tmp = page_files["tmp"]
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT), "RAYCMR_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycmr.cli", "serve", "--checkpoint", str(tmp / "ckpt"),
         "--index", str(tmp / "index"), "--port", str(port), "--replicas", "1",
         "--top-k", "4", "--rerank-k", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        assert "Ctrl-C stops" in "".join(lines), "".join(lines)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["gallery"] == N_IMAGES
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + out
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "stopped" in output
    assert "raycmr" not in serve.status().applications
    serve.shutdown()


@pytest.fixture(scope="module")
def page_files(ray_cluster, tmp_path_factory):
    """An image gallery, a random-init checkpoint and its index; the model and the rows."""
    tmp = tmp_path_factory.mktemp("page")
    model = write_tiny_image_app(tmp, N_IMAGES, captions_per_image=2)
    return {"tmp": tmp, "model": model, "rows": pq.read_table(tmp / "gallery").to_pylist()}


@pytest.fixture(scope="module")
def page_app(page_files):
    """The gallery served with the token on, on a free port."""
    import httpx
    from ray import serve

    from raycmr.serve.app import APP_NAME, build_app

    tmp = page_files["tmp"]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(tmp / "ckpt"), "index_path": str(tmp / "index"),
                         "top_k": 10, "rerank_k": 5, "replicas": 1, "max_replicas": 1},
                        token=TOKEN), name=APP_NAME, route_prefix="/")
    try:
        yield {**page_files, "url": f"http://127.0.0.1:{port}",
               "client": httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                      headers={"Authorization": f"Bearer {TOKEN}"})}
    finally:
        serve.shutdown()


def _references(app) -> dict[str, np.ndarray | list]:
    """Brute force with the model in this process: image and caption embeddings."""
    from raycmr.data.text import load_text_encoder
    from raycmr.data.transforms import decode_image

    rows = app["rows"]
    images = {r["image_id"]: r["image"] for r in rows}
    ids = sorted(images)
    pixels = torch.from_numpy(np.stack([decode_image(images[i], 32)[0] for i in ids]))
    tokens, mask = load_text_encoder("minilm")([r["caption"] for r in rows], 16)
    with torch.no_grad():
        img = app["model"].encode_image({"pixel_values": pixels}).numpy()
        txt = app["model"].encode_text({"input_ids": torch.from_numpy(tokens),
                                        "attention_mask": torch.from_numpy(mask)}).numpy()
    return {"ids": ids, "img": img, "txt": txt, "images": images}


def _browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's `chromium` package (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no playwright: pip install -e '.[test]' (Python package `playwright`)")
    return sync_playwright


def _wait(page, done, timeout_s: float = 30) -> None:
    """Poll ``done()`` (Python; CDP evaluation, which the page's CSP does not govern, unlike
    Playwright's wait_for_function, which evaluates a string inside the page)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out waiting on the page"
        page.wait_for_timeout(200)


@pytest.mark.ray
def test_search_page_in_chromium(page_app, tmp_path) -> None:
    sync_playwright = _browser()
    ref = _references(page_app)
    query = page_app["rows"][5]["caption"]
    q = ref["txt"][5]
    best = ref["ids"][int(np.argmax(ref["img"] @ q))]
    upload_id = ref["ids"][2]
    upload = tmp_path / "upload.png"
    upload.write_bytes(ref["images"][upload_id])
    caption_scores = ref["txt"] @ ref["img"][2]
    best_caption = page_app["rows"][int(np.argmax(caption_scores))]["caption"]
    served = page_app["client"].post("/search", json={"text": query, "k": 5}).json()
    assert [hit["stage"] for hit in served] == ["rerank"] * 5

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        requests_out: list[str] = []
        page.on("request", lambda r: requests_out.append(r.url))
        console: list[str] = []  # the page runs under its own Content-Security-Policy
        page.on("console", lambda m: console.append(m.text))
        page.goto(page_app["url"] + "/")
        page.fill("#token", "wrong-token")
        page.click("#login-form button")
        page.wait_for_selector("#login-status:has-text('wrong token')")
        page.fill("#token", TOKEN)
        page.click("#login-form button")
        page.wait_for_selector("#search-form", state="visible")
        page.fill("#query", query)
        page.fill("#k", "5")
        page.click("#search-form button")
        page.wait_for_selector(".card >> nth=4")
        _wait(page, lambda: page.eval_on_selector_all(
            ".card img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"))
        cards = page.locator(".card")
        assert cards.count() == 5
        assert [cards.nth(i).get_attribute("data-id") for i in range(5)] == \
            [hit["id"] for hit in served]  # the slow stage's order
        first_slow = page.inner_text(".card >> nth=0 >> .slow")
        assert first_slow == f"slow {served[0]['slow_score']:.2f} · final {served[0]['score']:.2f}"
        widths = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => i.naturalWidth)")
        assert widths == [32] * 5  # the gallery's own 32x32 PNGs
        status = page.inner_text("#status")
        assert "encode" in status and "rerank" in status and "5 results" in status
        page.uncheck("#rerank")  # the fast stage alone: the brute-force best first
        page.click("#search-form button")
        _wait(page, lambda: "5 results" in (t := page.inner_text("#status")) and
              "rerank" not in t)
        assert page.locator(".card").nth(0).get_attribute("data-id") == best
        assert page.inner_text(".card >> nth=0 >> .slow") == "not reranked"
        page.set_input_files("#file", str(upload))
        page.click("#upload-form button")
        page.wait_for_selector("#captions li")
        first = page.inner_text("#captions li >> nth=0")
        assert best_caption in first
        page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)
        browser.close()
    assert (tmp_path / "search_page.png").stat().st_size > 10_000
    assert not [m for m in console if "Content Security Policy" in m], console
    # nothing was fetched from anywhere but the app itself
    assert all(u.startswith(page_app["url"]) for u in requests_out), requests_out


@pytest.mark.ray
def test_image_routes(page_app) -> None:
    client = page_app["client"]
    row = page_app["rows"][0]
    got = client.get(f"/image/{row['image_id']}")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == row["image"]
    assert client.get("/image/nope").status_code == 404
    bad = client.post("/search/image", content=b"not an image")
    assert bad.status_code == 422 and "not a decodable image" in bad.text
