"""What the Serve app answers a hostile client: one row per attack (status, body, milliseconds,
the Gallery replica's RSS after it), against a tiny image gallery served with its token on.

    python benchmarks/serve_hostile_probe.py            # builds the app in a temp folder
    python benchmarks/serve_hostile_probe.py --skip huge_1x1000000_png

tests/test_serve_hostile.py fires the same :data:`ATTACKS` and asserts the statuses; this script
prints them (the issue-24 "before -> after" table in docs/serve_security.md quotes its output).
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TOKEN = "hostile-test-token-0123456789"
N_IMAGES = 8


def blank_png(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` black greyscale pixels, compressed (a few KB even for
    millions of pixels): the shape attacks need no big file."""
    packer, row, rows_per_block = zlib.compressobj(9), b"\x00" * (width + 1), 1024
    raw = b"".join(packer.compress(row * min(rows_per_block, height - i))
                   for i in range(0, height, rows_per_block)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    head = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def pil_image(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def _chunked(data: bytes, piece: int = 4096):
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def attacks(max_body: int) -> list[tuple[str, str, str, dict[str, Any], dict[str, str] | None]]:
    """``(name, method, path, httpx keywords, headers or None = the token)`` of every attack."""
    png = pil_image("PNG")
    none: dict[str, str] = {}
    return [
        ("malformed_json", "POST", "/search", {"content": b'{"text": "a cat", ',
                                               "headers": {"content-type": "application/json"}},
         None),
        ("json_not_an_object", "POST", "/search", {"json": ["a cat"]}, None),
        ("unknown_field", "POST", "/search", {"json": {"text": "a cat", "rerank_kk": 5}}, None),
        ("k_not_a_number", "POST", "/search", {"json": {"text": "a cat", "k": "ten"}}, None),
        ("k_huge", "POST", "/search", {"json": {"text": "a cat", "k": 10**30}}, None),
        ("beta_1e39", "POST", "/search", {"json": {"text": "a cat", "k": 5, "beta": 1e39}}, None),
        ("beta_nan", "POST", "/search", {"content": b'{"text": "a cat", "beta": NaN}',
                                         "headers": {"content-type": "application/json"}}, None),
        ("rerank_k_negative", "POST", "/search", {"json": {"text": "a", "rerank_k": -1}}, None),
        ("body_over_limit", "POST", "/search", {"content": b" " * (max_body + 1),
                                                "headers": {"content-type": "application/json"}},
         None),
        ("chunked_over_limit", "POST", "/search",
         {"content": _chunked(b" " * (max_body + 1)),
          "headers": {"content-type": "application/json"}}, None),
        ("chunked_image_over_limit", "POST", "/search/image",
         {"content": _chunked(b"\x00" * (max_body + 1))}, None),
        ("non_image", "POST", "/search/image", {"content": b"not an image at all"}, None),
        ("truncated_png", "POST", "/search/image", {"content": png[:len(png) // 2]}, None),
        ("gif", "POST", "/search/image", {"content": pil_image("GIF")}, None),
        ("tiff", "POST", "/search/image", {"content": pil_image("TIFF")}, None),
        ("bmp", "POST", "/search/image", {"content": pil_image("BMP")}, None),
        ("wide_1x20000_png", "POST", "/search/image", {"content": blank_png(20000, 1)},
         None),
        ("huge_1x1000000_png", "POST", "/search/image",
         {"content": blank_png(1_000_000, 1)}, None),
        ("huge_20000x20000_png", "POST", "/search/image",
         {"content": blank_png(20000, 20000)}, None),
        ("k_image_huge", "POST", "/search/image?k=100000", {"content": png}, None),
        ("missing_token", "POST", "/search", {"json": {"text": "a cat"}}, none),
        ("wrong_token", "POST", "/search", {"json": {"text": "a cat"}},
         {"Authorization": "Bearer wrong-token-0123456789"}),
        ("token_in_cookie_raw", "GET", "/stats", {"cookies": {"raycmr_token": TOKEN}}, none),
        ("path_traversal", "GET", "/image/..%2F..%2F..%2Fetc%2Fpasswd", {}, None),
        ("path_long_id", "GET", "/image/" + "a" * 5000, {}, None),
        ("login_wrong", "POST", "/login", {"json": {"token": "nope"}}, none),
        ("login_unknown_field", "POST", "/login", {"json": {"token": TOKEN, "x": 1}}, none),
    ]


def one_line(text: str) -> str:
    return text.replace("\n", "\\n")[:110]


def gallery_memory_mb() -> tuple[float, float]:
    """``(resident MB, peak resident MB)`` of the Gallery replica process(es) on this machine
    (the peak from /proc's VmHWM, so an upload that was freed again still shows)."""
    import psutil

    rss = peak = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        if "ServeReplica:raycmr:Gallery" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            rss += proc.memory_info().rss / 2**20
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak += int(status.split("VmHWM:")[1].split()[0]) / 1024
        except (psutil.NoSuchProcess, FileNotFoundError, IndexError):
            pass
    return rss, peak


def fire(url: str, attack, timeout: float = 120) -> tuple[int, str, dict[str, str], float]:
    """``(status, body text, headers, milliseconds)`` of one attack (status 0: no answer)."""
    import httpx

    _name, method, path, kwargs, headers = attack
    kwargs = dict(kwargs)
    if headers is None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
    headers = {**headers, **kwargs.pop("headers", {})}
    cookies = kwargs.pop("cookies", None)
    t0 = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=timeout, cookies=cookies) as client:
            r = client.request(method, path, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}", {}, 1000 * (time.perf_counter() - t0)
    return r.status_code, r.text, dict(r.headers), 1000 * (time.perf_counter() - t0)


def write_tiny_image_app(tmp: Path, n_images: int, captions_per_image: int):
    """A random-init image/text dual encoder (tiny ViT + BERT, MiniLM tokenizer) in
    ``tmp/ckpt``, a random-init slow model in ``tmp/slow`` and a synthetic 32 px gallery of
    ``n_images`` in ``tmp/gallery``, indexed with phi(x) in ``tmp/index``; returns the model."""
    import torch

    from raycmr.artifacts import write_export
    from raycmr.config import config_from_dict, load_config
    from raycmr.data.synthetic import write_synthetic_split
    from raycmr.index.gallery import build_gallery_index
    from raycmr.models.dual_encoder import DualEncoder
    from raycmr.models.slow import build_slow_model

    write_synthetic_split(tmp / "gallery", "test", n_images, seed=3, image_size=32,
                          captions_per_image=captions_per_image, progress=False)
    cfg = config_from_dict({
        "data": {"kind": "images", "test": [str(tmp / "gallery")], "image_size": 32,
                 "tokenizer": "minilm", "max_text_len": 16},
        "model": {"embed_dim": 16,
                  "image": {"kind": "hf_config", "hf_config": {
                      "model_type": "vit", "image_size": 32, "patch_size": 8,
                      "num_channels": 3, "hidden_size": 16, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "intermediate_size": 32}},
                  "text": {"kind": "hf_config", "hf_config": {
                      "model_type": "bert", "vocab_size": 30522, "hidden_size": 16,
                      "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 32, "max_position_embeddings": 32}}},
        "index": {"kind": "flat"}})
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    (tmp / "ckpt").mkdir()
    write_export(tmp / "ckpt", model.state_dict(), cfg, {"epoch": 0})
    slow_cfg = load_config("quickstart_slow", [
        f"data.test=[{tmp / 'gallery'}]", "data.image_size=32", "data.max_text_len=16",
        "slow.width=16", "slow.heads=2", "slow.decoder_layers=1"])
    (tmp / "slow").mkdir()
    write_export(tmp / "slow", build_slow_model(slow_cfg.slow, torch.arange(1000, 3000), 32,
                                                16).state_dict(), slow_cfg, {"epoch": 0})
    build_gallery_index(str(tmp / "ckpt"), "test", tmp / "index", slow=str(tmp / "slow"),
                        num_actors=1, batch_size=16)
    return model


def build_files(tmp: Path) -> dict[str, Any]:
    """An indexed 8-image gallery of :func:`write_tiny_image_app`: the app's args."""
    write_tiny_image_app(tmp, N_IMAGES, captions_per_image=1)
    return {"checkpoint": str(tmp / "ckpt"), "index_path": str(tmp / "index"), "top_k": 10,
            "rerank_k": 4, "replicas": 1, "max_replicas": 1, "max_body_bytes": 1_000_000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", nargs="*", default=[], help="attack names not to fire")
    opts = parser.parse_args()
    import ray
    from ray import serve

    from raycmr.serve.app import APP_NAME, build_app

    ray.init(address="local", num_cpus=8, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        args = build_files(Path(tmp))
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args, token=TOKEN), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        print("| attack | status | ms | Gallery RSS / peak MB | body |\n|---|---|---|---|---|")
        for attack in attacks(args["max_body_bytes"]):
            if attack[0] in opts.skip:
                print(f"| {attack[0]} | not fired | | | |")
                continue
            status, body, _, ms = fire(url, attack)
            rss, peak = gallery_memory_mb()
            print(f"| {attack[0]} | {status} | {ms:.0f} | {rss:.0f} / {peak:.0f} | "
                  f"`{one_line(body)}` |", flush=True)
        alive = fire(url, ("healthz", "GET", "/healthz", {}, {}))[0]
        print(f"after all: /healthz {alive}")
        serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
