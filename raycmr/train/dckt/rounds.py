"""DCKT progressive knowledge transfer, driven round by round on a Ray cluster.

DCKT (Huang & Peng, "Deep Cross-media Knowledge Transfer", CVPR 2018) transfers from a large
source domain to a small target domain (different label spaces allowed) with two-level transfer
losses (:mod:`raycmr.train.dckt.objective`) and a progressive schedule:

* round 0 - per-domain pretraining: both branches train on their own losses (VSE++, semantic,
  pairwise constraint) with the MMD links off, on every target pair, for ``train.epochs``
  passes over the source;
* rounds ``k = 1 .. dckt.rounds`` - the source model of the previous round's checkpoint embeds
  every target training pair (Ray Data actor pool, :func:`raycmr.evaluate.embedding.embed_pairs`); on
  the driver, pair ``q`` scores ``AP_q = (AP(img_q -> texts) + AP(txt_q -> images)) / 2`` among
  the target pairs (:func:`~raycmr.train.dckt.selection.pair_average_precision`) and is selected
  with probability::

      Pr_q = max(0, min(alpha, 1 - (max_p AP_p - AP_q) / (max_p AP_p * k)))

  (:func:`~raycmr.train.dckt.selection.selection_probabilities`, independent Bernoulli draws
  with ``np.random.default_rng([train.seed, k])``); the round then trains on the source and the
  selected target pairs with the MMD links on, for ``dckt.epochs_per_round`` source passes.
  Easy pairs (high AP) enter first, and the selection drifts toward uniform (``alpha`` for
  every pair) as ``k`` grows.

Every round is one Ray Train ``TorchTrainer`` run with DeepSpeed (any number of workers) that
resumes from the previous round's checkpoint: weights, optimizer and LR schedule (which spans
all rounds) continue, and so does the global step. Runs land in
``train.storage_path/NAME/round{k}``; each round's selection (pair_key, AP, probability,
selected) is written next to them as ``selection_round{k}.parquet``. Every checkpoint holds the
target model as a plain DualEncoder (``model.pt``: ``raycmr eval``/serving use it as is) and
the source model (``source_model.pt``, :func:`load_source_model`).

If fewer than ``2 x train.num_workers`` pairs are drawn (the MMD needs two target rows on every
worker), the most probable unselected pairs are added and counted as ``topped_up``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raycmr import artifacts
from raycmr.config import Config, ConfigError, with_overrides
from raycmr.data.domains import (
    DomainSpec,
    build_domain_dataset,
    domain_specs,
    pair_keys,
    read_domain_columns,
)
from raycmr.data.paths import split_uri
from raycmr.evaluate.embedding import embed_pairs
from raycmr.models.dual_encoder import DualEncoder
from raycmr.train.dckt.objective import source_model_config
from raycmr.train.dckt.selection import (
    pair_average_precision,
    select_pairs,
    selection_probabilities,
)
from raycmr.train.dckt.task import SOURCE_MODEL_FILE
from raycmr.train.trainer import absolute_storage_path, build_trainer, run_name


@dataclass
class DCKTPlan:
    """What the driver learnt before the first round."""

    source: DomainSpec
    target: DomainSpec
    source_rows: int
    target_rows: int
    target_keys: np.ndarray  # sorted pair keys of every target row
    source_classes: int
    target_classes: int
    per_epoch: int  # optimizer steps per pass over the source
    round_epochs: list[int]  # source passes of round 0, 1, ..., dckt.rounds

    @property
    def total_steps(self) -> int:
        return self.per_epoch * sum(self.round_epochs)


@dataclass
class Selection:
    """The target pairs one transfer round trains on (arrays aligned, sorted by pair_key)."""

    round: int
    pair_key: np.ndarray
    ap: np.ndarray
    prob: np.ndarray
    selected: np.ndarray  # bool
    topped_up: int = 0

    @property
    def count(self) -> int:
        return int(self.selected.sum())

    @property
    def expected(self) -> float:
        return float(self.prob.sum())


@dataclass
class RoundRecord:
    round: int
    run_path: str
    checkpoint_path: str
    metrics: dict[str, Any]  # the round's last report
    history: list[dict[str, Any]]  # every report of the round
    selection: Selection | None  # None in round 0 (all target pairs)


@dataclass
class DCKTResult:
    """Shaped like Ray Train's Result (``error``, ``metrics``, ``checkpoint``, ``path``,
    ``best_checkpoints`` of the last round) so that ``raycmr train`` prints it, plus the
    per-round records."""

    path: str
    rounds: list[RoundRecord] = field(default_factory=list)
    error: Exception | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None
    best_checkpoints: list = field(default_factory=list)

    @property
    def history(self) -> list[dict[str, Any]]:
        return [h for r in self.rounds for h in r.history]


# ------------------------------------------------------------------------------------ planning


def plan_dckt(cfg: Config) -> tuple[Config, DCKTPlan]:
    """Check the DCKT config and data on the driver; resolve the class counts into the config
    (``model.num_classes`` = target classes, ``dckt.source_classes``). Raises ConfigError."""
    d, t = cfg.dckt, cfg.train
    if d.rounds < 0:
        raise ConfigError(f"dckt.rounds must be >= 0 (transfer rounds after round 0), got {d.rounds}")
    if d.rounds > 0 and d.epochs_per_round <= 0:
        raise ConfigError(f"dckt.epochs_per_round must be positive, got {d.epochs_per_round}")
    if t.epochs <= 0:
        raise ConfigError(f"train.epochs (round 0 source passes) must be positive, got {t.epochs}")
    if not 0.0 < d.alpha <= 1.0:
        raise ConfigError(f"dckt.alpha (selection probability ceiling) must be in (0, 1], "
                          f"got {d.alpha}")
    for key in ("mmd_weight", "pair_weight", "semantic_weight"):
        if getattr(d, key) < 0:
            raise ConfigError(f"dckt.{key} must be >= 0, got {getattr(d, key)}")
    if not d.kernel_bandwidths or any(s <= 0 for s in d.kernel_bandwidths):
        raise ConfigError(f"dckt.kernel_bandwidths must be positive numbers, got "
                          f"{d.kernel_bandwidths}")
    if cfg.model.shared_layers < 1:
        raise ConfigError("DCKT's correlation-level transfer needs shared common layers: set "
                          "model.shared_layers >= 1")
    source, target = domain_specs(cfg)
    src = read_domain_columns(source, cfg.data, ("label",))
    tgt = read_domain_columns(target, cfg.data, ("id", "label"))
    source_rows, target_rows = len(src["label"]), len(tgt["label"])
    if source_rows == 0 or target_rows == 0:
        raise ConfigError(f"DCKT needs rows in both domains: source {source.describe()} has "
                          f"{source_rows}, target {target.describe()} has {target_rows}")
    if (tgt["label"] < 0).any():
        raise ConfigError(f"DCKT's pair selection ranks target pairs by label: "
                          f"{int((tgt['label'] < 0).sum())} target rows have no label")
    keys = pair_keys(tgt["id"])
    if np.unique(keys).size != keys.size:
        raise ConfigError(f"DCKT identifies target pairs by their 'id': the ids in "
                          f"{target.describe()} are not unique")
    labelled = src["label"][src["label"] >= 0]
    source_classes = d.source_classes or (int(labelled.max()) + 1 if labelled.size else 0)
    if source_classes <= 0:
        raise ConfigError("the source domain has no labels: set dckt.source_classes (its "
                          "semantic loss then ignores the unlabelled rows)")
    if labelled.size and labelled.max() >= source_classes:
        raise ConfigError(f"dckt.source_classes={source_classes} but a source label is "
                          f"{int(labelled.max())}")
    target_classes = cfg.model.num_classes or int(tgt["label"].max()) + 1
    if tgt["label"].max() >= target_classes:
        raise ConfigError(f"model.num_classes={target_classes} (target classes) but a target "
                          f"label is {int(tgt['label'].max())}")
    per_epoch = (source_rows // t.num_workers) // t.batch_size // t.grad_accum
    if per_epoch == 0:
        raise ConfigError(f"{source_rows} source rows give no full batch for {t.num_workers} "
                          f"workers x train.batch_size={t.batch_size}: lower one of them")
    if target_rows < 2 * t.num_workers:
        raise ConfigError(f"{target_rows} target pairs: the MMD needs >= 2 per worker "
                          f"({t.num_workers} workers)")
    cfg = with_overrides(cfg, {"model.num_classes": target_classes,
                               "dckt.source_classes": source_classes})
    plan = DCKTPlan(source, target, source_rows, target_rows, np.sort(keys), source_classes,
                    target_classes, per_epoch, [t.epochs] + [d.epochs_per_round] * d.rounds)
    return cfg, plan


# ------------------------------------------------------------------------------------ models


def load_source_model(path: str | Path) -> tuple[DualEncoder, Config]:
    """The source model of a DCKT checkpoint (a DualEncoder with the shared layers and the
    source classifier) and the run's config."""
    directory = artifacts.find_checkpoint(path)
    cfg = artifacts.read_config(directory)
    model = DualEncoder(source_model_config(cfg.model, cfg.dckt.source_classes),
                        temperature=cfg.loss.temperature)
    model.load_state_dict(artifacts.read_weights(directory, SOURCE_MODEL_FILE))
    model.eval()
    return model, cfg


def _read_checkpoint(checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(source state dict, state.json)`` of a Ray Train checkpoint (local or remote)."""
    with checkpoint.as_directory() as directory:
        return artifacts.read_weights(directory, SOURCE_MODEL_FILE), artifacts.read_state(directory)


# ----------------------------------------------------------------------------------- selection


def select_round(cfg: Config, plan: DCKTPlan, round_idx: int, source_state: dict,
                 num_actors: int) -> Selection:
    """Score every target pair with the source model (distributed embedding, AP on the driver)
    and draw the pairs of round ``round_idx`` (module docstring)."""
    scorer_cfg = dataclasses.replace(
        cfg, model=source_model_config(cfg.model, plan.source_classes))
    emb = embed_pairs(plan.target, scorer_cfg, source_state, num_actors=num_actors,
                      batch_size=cfg.eval.batch_size)
    ap = pair_average_precision(emb["img"], emb["txt"], emb["label"])
    prob = selection_probabilities(ap, round_idx, cfg.dckt.alpha)
    selected = select_pairs(prob, np.random.default_rng([cfg.train.seed, round_idx]))
    least = min(2 * cfg.train.num_workers, selected.size)
    topped_up = 0
    if selected.sum() < least:
        order = np.argsort(-prob, kind="stable")
        for q in order[~selected[order]][: least - int(selected.sum())]:
            selected[q] = True
            topped_up += 1
    return Selection(round_idx, emb["pair_key"], ap, prob, selected, topped_up)


def _write_selection(selection: Selection, root: str) -> str:
    path = f"{root}/selection_round{selection.round}.parquet"
    fs, inner, _ = split_uri(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    table = pa.table({"pair_key": selection.pair_key, "ap": selection.ap,
                      "prob": selection.prob, "selected": selection.selected})
    pq.write_table(table, inner, filesystem=fs)
    return path


# ------------------------------------------------------------------------------------- rounds


def _storage_root(cfg: Config, name: str) -> str:
    return f"{absolute_storage_path(cfg.train.storage_path).rstrip('/')}/{name}"


def build_round_trainer(cfg: Config, plan: DCKTPlan, round_idx: int, root: str,
                        keys: np.ndarray | None, resume_from: str):
    """The TorchTrainer of one round (task ``dckt``, :mod:`raycmr.train.dckt.task`):
    ``source`` and ``target`` (the selected ``keys``; None = all pairs) split across workers,
    ``val`` sharded for validation."""
    t = cfg.train
    round_cfg = with_overrides(cfg, {"train.resume_from": resume_from})
    datasets = {
        "source": build_domain_dataset(plan.source, cfg.data, training=True,
                                       seed=t.seed + round_idx),
        "target": build_domain_dataset(plan.target, cfg.data, training=True,
                                       seed=t.seed + round_idx, keys=keys),
    }
    rows = {"source": plan.source_rows, "target": plan.target_rows if keys is None else len(keys)}
    for split, n in rows.items():
        if n <= cfg.data.cache_train_rows:  # small: read and decode once, not once per epoch
            datasets[split] = datasets[split].materialize()
    task_params = {
        "round": round_idx, "epochs_before": sum(plan.round_epochs[:round_idx]),
        "mmd_weight": 0.0 if round_idx == 0 else cfg.dckt.mmd_weight,
        "source_classes": plan.source_classes, "target_pairs": rows["target"],
    }
    loop = {"steps_per_epoch": plan.per_epoch, "epochs": plan.round_epochs[round_idx],
            "epoch_offset": task_params["epochs_before"], "total_steps": plan.total_steps,
            "seed_offset": 1000 * round_idx}
    # keep the newest: the next round starts from this round's last checkpoint
    return build_trainer(round_cfg, name=f"round{round_idx}", storage_path=root, task="dckt",
                         task_params=task_params, datasets=datasets, loop=loop,
                         keep_best=False)


def run_dckt(cfg: Config, *, name: str | None = None, board=None) -> DCKTResult:
    """Round 0 (MMD off) then ``dckt.rounds`` transfer rounds; returns every round's record.
    Joins the Ray cluster of RAY_ADDRESS or starts a local one. The rounds report through log
    lines (``board`` is not used)."""
    from raycmr.resources import check_cluster_fits, training_demand
    from raycmr.runtime import cluster_storage_path, init_ray

    cluster_storage_path(cfg.train.storage_path, "train.storage_path")  # refuse before Ray starts
    cfg, plan = plan_dckt(cfg)
    init_ray(min_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.reserved_cpus)
    check_cluster_fits(training_demand(cfg))
    name = name or run_name(cfg)
    root = _storage_root(cfg, name)
    if "://" not in root and any(Path(root).glob("round*")):
        # Ray Train would silently continue those runs' checkpoints (same name, same storage)
        raise ConfigError(f"DCKT run directory {root} already holds rounds: choose another "
                          "train.name, or remove it")
    result = DCKTResult(path=root)
    print(f"[raycmr dckt] source {plan.source_rows} pairs ({plan.source_classes} classes), "
          f"target {plan.target_rows} pairs ({plan.target_classes} classes); "
          f"{plan.per_epoch} steps per source pass, rounds 0..{cfg.dckt.rounds} x "
          f"{plan.round_epochs} passes = {plan.total_steps} steps; runs in {root}", flush=True)
    resume_from = cfg.train.resume_from
    source_state: dict | None = None
    for round_idx in range(cfg.dckt.rounds + 1):
        selection, keys = None, None
        if round_idx > 0:
            selection = select_round(cfg, plan, round_idx, source_state,
                                     num_actors=cfg.train.num_workers)
            keys = selection.pair_key[selection.selected]
            _write_selection(selection, root)
            print(f"[raycmr dckt] round {round_idx}: selected {selection.count} of "
                  f"{selection.selected.size} target pairs (expected {selection.expected:.1f}, "
                  f"topped up {selection.topped_up}; mean AP {selection.ap.mean():.4f}, "
                  f"max AP {selection.ap.max():.4f})", flush=True)
        fit = build_round_trainer(cfg, plan, round_idx, root, keys, resume_from).fit()
        if fit.error is not None or fit.checkpoint is None:
            result.error = fit.error or RuntimeError(f"DCKT round {round_idx} saved no checkpoint")
            return result
        source_state, state = _read_checkpoint(fit.checkpoint)
        history = [h for h in state.get("history", []) if h.get("round") == round_idx]
        result.rounds.append(RoundRecord(round_idx, str(fit.path), fit.checkpoint.path,
                                         dict(fit.metrics or {}), history, selection))
        result.metrics, result.checkpoint = dict(fit.metrics or {}), fit.checkpoint
        result.best_checkpoints = list(fit.best_checkpoints or [])
        resume_from = fit.checkpoint.path
    return result
