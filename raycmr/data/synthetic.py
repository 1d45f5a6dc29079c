"""Procedural image-caption data: coloured shapes on a 3x3 grid, captions from the same attributes.

An image holds 1-3 object groups at distinct positions (left, right, top, bottom, center); a group
is 1 or 2 shapes of one kind, colour and size ("two large red circles on the left"). Captions are
composed from the groups with one of several templates. With 5 shapes x 7 colours x 2 sizes x
2 counts x 5 positions per group, 500 held-out images have almost all distinct descriptions, yet a
tiny ViT + tiny BERT learns the mapping on CPU. Everything is deterministic by seed.

``label`` is the colour index of the first (main) group; ``domain`` is the background style
("plain" or "noisy").
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from raycmr.data.schema import image_shard_schema
from raycmr.data.writers import ShardWriter, WriteSummary

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
DOMAINS = ("plain", "noisy")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_COUNT_WORDS = {1: "a", 2: "two"}
_GROUP_PROBS = (0.2, 0.45, 0.35)  # P(1, 2, 3 groups)
_TEMPLATES = (
    "{objects}",
    "a picture of {objects}",
    "there is {objects}",
    "an image showing {objects}",
    "{objects} on a {background} background",
)


@dataclass(frozen=True)
class Group:
    """``count`` shapes of one kind, colour and size at one position."""

    count: int
    size: str
    colour: str
    shape: str
    position: str

    def phrase(self) -> str:
        noun = self.shape + ("es" if self.shape == "cross" and self.count > 1 else "")
        noun += "s" if self.count > 1 and self.shape != "cross" else ""
        return f"{_COUNT_WORDS[self.count]} {self.size} {self.colour} {noun} " + \
            POSITION_PHRASES[self.position]


@dataclass(frozen=True)
class Scene:
    """The attributes of one synthetic image."""

    groups: tuple[Group, ...]
    domain: str

    @property
    def label(self) -> int:
        return COLOUR_NAMES.index(self.groups[0].colour)

    def key(self) -> tuple:
        """Order-free description: two scenes with the same key look the same to a caption."""
        return tuple(sorted((g.position, g.count, g.size, g.colour, g.shape) for g in self.groups))


def sample_scene(rng: np.random.Generator, domain: str = "mixed") -> Scene:
    """Draw the attributes of one image."""
    n_groups = int(rng.choice(3, p=_GROUP_PROBS)) + 1
    positions = rng.choice(list(POSITIONS), size=n_groups, replace=False)
    groups = tuple(
        Group(
            count=int(rng.integers(1, 3)),
            size=str(rng.choice(SIZES)),
            colour=str(rng.choice(COLOUR_NAMES)),
            shape=str(rng.choice(SHAPES)),
            position=str(pos),
        )
        for pos in positions
    )
    if domain == "mixed":
        domain = str(rng.choice(DOMAINS))
    return Scene(groups, domain)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene``: groups in a random order joined by one of the templates."""
    phrases = [g.phrase() for g in scene.groups]
    order = rng.permutation(len(phrases))
    phrases = [phrases[i] for i in order]
    objects = phrases[0] if len(phrases) == 1 else \
        ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    background = "dark" if scene.domain == "plain" else "noisy"
    return template.format(objects=objects, background=background)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    w = r * 0.38  # cross
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def layout(group: Group, image_size: int) -> tuple[list[tuple[float, float]], float]:
    """Nominal shape centres (before jitter) and radius of ``group`` in pixels."""
    cell = image_size / 3
    gx, gy = POSITIONS[group.position]
    cx, cy = (gx + 0.5) * cell, (gy + 0.5) * cell
    radius = (0.42 if group.size == "large" else 0.24) * cell
    if group.count == 1:
        return [(cx, cy)], radius
    d = 0.3 * cell
    if group.position in ("left", "right"):
        return [(cx, cy - d), (cx, cy + d)], radius * 0.6
    if group.position == "center":  # diagonal: stays inside the center cell
        d = 0.22 * cell
        return [(cx - d, cy - d), (cx + d, cy + d)], radius * 0.6
    return [(cx - d, cy), (cx + d, cy)], radius * 0.6


def render(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image (positions, sizes and colours slightly jittered)."""
    base = rng.integers(0, 40, size=3)
    if scene.domain == "noisy":
        noise = rng.integers(-30, 31, size=(image_size, image_size, 3))
        pixels = np.clip(base + 30 + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, "RGB")
    else:
        img = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    for group in scene.groups:
        centres, radius = layout(group, image_size)
        colour = np.clip(np.array(COLOURS[group.colour]) + rng.integers(-20, 21, size=3), 0, 255)
        fill = tuple(int(v) for v in colour)
        for x, y in centres:
            x += rng.uniform(-0.04, 0.04) * cell
            y += rng.uniform(-0.04, 0.04) * cell
            if group.shape == "circle":
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
            else:
                draw.polygon(_polygon(group.shape, x, y, radius), fill=fill)
    return img


def encode(img: Image.Image, image_format: str = "png") -> bytes:
    """PNG or JPEG bytes of ``img`` (deterministic)."""
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    elif image_format in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=90)
    else:
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    return buf.getvalue()


@dataclass
class SyntheticRecord:
    """One image with its captions, as written to the shards."""

    image_id: str
    image: bytes
    captions: list[str]
    scene: Scene
    group: str = ""  # with hard images: the source scene's image_id, shared by its variants
    swap: str = ""  # with hard images: "source" or the variant's kind of swap


def generate(
    n: int,
    seed: int,
    split: str = "train",
    *,
    image_size: int = 64,
    captions_per_image: int = 1,
    image_format: str = "png",
    domain: str = "mixed",
    start: int = 0,
    hard_images: bool = False,
):
    """Yield records ``start`` .. ``start + n - 1`` (:class:`SyntheticRecord`); record ``i``
    depends only on (seed, split, i), so any range can be generated on its own.

    With ``hard_images`` each record is followed by its rendered hard negatives: one scene per
    kind of swap (:func:`hard_variants`), each with its own image and captions, ids
    ``{image_id}-{kind}``; the record itself is the same as without."""
    code = SPLIT_CODES.get(split, 3)
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, code, i])
        scene = sample_scene(rng, domain)
        img = render(scene, rng, image_size)
        captions = [caption(scene, rng) for _ in range(captions_per_image)]
        image_id = f"{split}-{i:07d}"
        group = {"group": image_id, "swap": "source"} if hard_images else {}
        yield SyntheticRecord(image_id, encode(img, image_format), captions, scene, **group)
        if hard_images:
            for kind, variant in hard_variants(scene, rng):
                yield SyntheticRecord(
                    f"{image_id}-{kind}", encode(render(variant, rng, image_size), image_format),
                    [caption(variant, rng) for _ in range(captions_per_image)], variant,
                    group=image_id, swap=kind)


def write_synthetic_split(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int,
    *,
    image_size: int = 64,
    captions_per_image: int = 1,
    rows_per_shard: int = 1000,
    image_format: str = "png",
    domain: str = "mixed",
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    hard_images: bool = False,
) -> WriteSummary:
    """Write one split as image shards; one row per caption (rows = n * captions_per_image).
    ``hard_images``: each scene is followed by its rendered hard negatives (:func:`generate`),
    the rows carrying ``group`` (the source's image_id) and ``swap`` columns; one process.

    ``workers`` > 1 renders in that many processes, each writing whole shards; the files are
    the same as with one process (records depend only on their index, shard boundaries fall
    where one process would cut them), which needs ``rows_per_shard`` to be a multiple of
    ``captions_per_image``."""
    options = {"image_size": image_size, "captions_per_image": captions_per_image,
               "image_format": image_format, "domain": domain}
    if workers > 1 and n > rows_per_shard and not hard_images:
        return _write_parallel(out_dir, split, n, seed, rows_per_shard, overwrite, progress,
                               workers, options)
    from raycmr.data.schema import OPTIONAL_COLUMNS

    columns = (*OPTIONAL_COLUMNS, "group", "swap") if hard_images else OPTIONAL_COLUMNS
    writer = ShardWriter(out_dir, image_shard_schema(columns), rows_per_shard,
                         overwrite=overwrite, progress=f"synthetic {split}" if progress else None,
                         total=None if hard_images else n * captions_per_image)
    with writer:
        _write_records(writer, generate(n, seed, split, hard_images=hard_images, **options))
    return writer.summary


def _write_records(writer: ShardWriter, records) -> None:
    for rec in records:
        group = {"group": rec.group, "swap": rec.swap} if rec.group else {}
        for j, text in enumerate(rec.captions):
            writer.write({"id": f"{rec.image_id}-{j}", "image": rec.image, "caption": text,
                          "image_id": rec.image_id, "label": rec.scene.label,
                          "domain": rec.scene.domain, **group})


def _write_chunk(out_dir: str, split: str, start: int, n: int, seed: int, rows_per_shard: int,
                 first_shard: int, options: dict[str, Any]) -> WriteSummary:
    """One process's part of :func:`_write_parallel`: images ``start`` .. ``start + n - 1`` as
    shards ``part-{first_shard}`` on."""
    writer = ShardWriter(out_dir, image_shard_schema(), rows_per_shard, first_shard=first_shard)
    with writer:
        _write_records(writer, generate(n, seed, split, start=start, **options))
    return writer.summary


def _write_parallel(out_dir: str | Path, split: str, n: int, seed: int, rows_per_shard: int,
                    overwrite: bool, progress: bool, workers: int,
                    options: dict[str, Any]) -> WriteSummary:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from raycmr.data.writers import prepare_shard_dir
    from raycmr.reporting.bars import RowsBar

    per_image = options["captions_per_image"]
    if rows_per_shard % per_image:
        raise ValueError(f"--workers > 1 writes whole shards per process: --rows-per-shard "
                         f"({rows_per_shard}) must be a multiple of --captions-per-image "
                         f"({per_image}), or use --workers 1")
    prepare_shard_dir(out_dir, overwrite)
    images_per_shard = rows_per_shard // per_image
    shards = -(-n // images_per_shard)
    shards_per_task = max(1, min(10, shards // (4 * workers)))
    chunk = shards_per_task * images_per_shard
    bar = RowsBar(f"synthetic {split}", n * per_image) if progress else None
    summary, done = WriteSummary(), 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_write_chunk, str(out_dir), split, start, min(chunk, n - start),
                               seed, rows_per_shard, start // images_per_shard, options)
                   for start in range(0, n, chunk)]
        for future in futures:  # in shard order, so the summary lists files in order
            part = future.result()
            summary = summary.merge(part)
            done += part.rows
            if bar is not None:
                bar.update(done)
    if bar is not None:
        bar.close()
    return summary


def write_synthetic_splits(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    **options: Any,
) -> dict[str, WriteSummary]:
    """Write ``out_dir/{train,val,test}/part-*.parquet``; the splits draw from disjoint seeds.
    ``options`` are :func:`write_synthetic_split`'s keywords (image_size, captions_per_image,
    rows_per_shard, image_format, domain, overwrite, progress, workers); ``hard_images``
    applies to the training split only.

    Returns one :class:`WriteSummary` per split (rows = images * captions_per_image).
    """
    if options.get("captions_per_image", 1) <= 0:
        raise ValueError(f"captions_per_image must be positive, got {options['captions_per_image']}")
    hard = options.pop("hard_images", False)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {split: write_synthetic_split(f"{out_dir}/{split}", split, n, seed,
                                         hard_images=hard and split == "train", **options)
            for split, n in sizes.items()}


# ------------------------------------------------------------------------------ minimal pairs

#: a minimal-pair group's kind of swap: two objects exchange their colours, shapes or positions
SWAP_KINDS = ("colour", "shape", "position")


def swap_binding(scene: Scene, i: int, j: int, kind: str) -> Scene | None:
    """``scene`` with groups ``i`` and ``j`` exchanging their ``kind`` (colour, shape or
    position); None when that leaves the scene as it was (the two share the attribute)."""
    a, b = scene.groups[i], scene.groups[j]
    if kind not in SWAP_KINDS:
        raise ValueError(f"swap kind must be one of {', '.join(SWAP_KINDS)}, got {kind!r}")
    groups = list(scene.groups)
    groups[i] = dataclasses.replace(a, **{kind: getattr(b, kind)})
    groups[j] = dataclasses.replace(b, **{kind: getattr(a, kind)})
    swapped = Scene(tuple(groups), scene.domain)
    return None if swapped.key() == scene.key() else swapped


def minimal_pair_group(scene: Scene, kind: str) -> list[Scene]:
    """``scene`` and every distinct scene one ``kind`` swap between two of its groups makes
    (the original first); a group of one when no swap changes it."""
    out = [scene]
    for i in range(len(scene.groups)):
        for j in range(i + 1, len(scene.groups)):
            swapped = swap_binding(scene, i, j, kind)
            if swapped is not None and swapped.key() not in {s.key() for s in out}:
                out.append(swapped)
    return out


def hard_variants(scene: Scene, rng: np.random.Generator) -> list[tuple[str, Scene]]:
    """A scene's rendered hard negatives: for each kind of swap (:data:`SWAP_KINDS`), one pair
    of its groups drawn at random among those whose swap changes the scene, swapped
    (:func:`swap_binding`); no two variants alike. Empty for a scene of one group."""
    pairs = [(i, j) for i in range(len(scene.groups)) for j in range(i + 1, len(scene.groups))]
    out, keys = [], {scene.key()}
    for kind in SWAP_KINDS:
        for p in rng.permutation(len(pairs)):
            swapped = swap_binding(scene, *pairs[p], kind)
            if swapped is not None and swapped.key() not in keys:
                out.append((kind, swapped))
                keys.add(swapped.key())
                break
    return out


def generate_minimal_pairs(n_groups: int, seed: int, *, image_size: int = 64,
                           image_format: str = "png", domain: str = "mixed"):
    """Yield ``(group_id, kind, records)`` for ``n_groups`` minimal-pair groups: a scene of 2-3
    object groups and its one-swap variants (:func:`minimal_pair_group`; kinds in turn, see
    :data:`SWAP_KINDS`), each rendered and captioned on its own. Deterministic by seed."""
    for g in range(n_groups):
        kind = SWAP_KINDS[g % len(SWAP_KINDS)]
        rng = np.random.default_rng([seed, 4, g])
        while True:
            scenes = minimal_pair_group(sample_scene(rng, domain), kind)
            if len(scenes) > 1:
                break
        records = []
        for v, scene in enumerate(scenes):
            img = render(scene, rng, image_size)
            records.append(SyntheticRecord(f"mp-{g:06d}-{v}", encode(img, image_format),
                                           [caption(scene, rng)], scene))
        yield f"mp-{g:06d}", kind, records


def write_minimal_pairs(out_dir: str | Path, n_groups: int, seed: int, *, image_size: int = 64,
                        rows_per_shard: int = 1000, image_format: str = "png",
                        domain: str = "mixed", overwrite: bool = False,
                        progress: bool = True) -> WriteSummary:
    """Image shards of minimal-pair groups with two more columns: ``group`` (the rows of one
    group differ in one binding) and ``swap`` (its kind: colour, shape or position)."""
    from raycmr.data.schema import OPTIONAL_COLUMNS

    writer = ShardWriter(out_dir, image_shard_schema((*OPTIONAL_COLUMNS, "group", "swap")),
                         rows_per_shard, overwrite=overwrite,
                         progress="minimal pairs" if progress else None)
    with writer:
        for group_id, kind, records in generate_minimal_pairs(
                n_groups, seed, image_size=image_size, image_format=image_format, domain=domain):
            for rec in records:
                writer.write({"id": f"{rec.image_id}-0", "image": rec.image,
                              "caption": rec.captions[0], "image_id": rec.image_id,
                              "label": rec.scene.label, "domain": rec.scene.domain,
                              "group": group_id, "swap": kind})
    return writer.summary
