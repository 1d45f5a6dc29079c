"""Removing checkpoints that Ray Train wrote but never registered.

Every worker uploads its part of a checkpoint into ``RUN/checkpoint_<time>/`` during
``ray.train.report``; the controller registers the checkpoint only once every worker's report
has arrived, and ``CheckpointConfig(num_to_keep)`` deletes only registered checkpoints. A worker
that dies after the upload began but before its report was collected leaves a folder that looks
complete (``model.pt``, ``state.json``) but that Ray Train never tracks: it outlives
``num_to_keep``, and ``find_checkpoint_dir(RUN)`` (newest first) would pick it although some
ranks' DeepSpeed shards may be missing. After ``fit()`` the registered set is final, so anything
else is removed.
"""

from __future__ import annotations

import pyarrow.fs as pafs


def remove_unregistered_checkpoints(result) -> list[str]:
    """Delete the ``checkpoint_*`` folders of ``result.path`` (a Ray Train ``Result``) that are
    neither its latest nor one of its best (kept) checkpoints; returns the removed paths."""
    fs = result.filesystem
    kept = {c.path.rstrip("/") for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(result.checkpoint.path.rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(result.path, allow_not_found=True))
    removed = []
    for info in infos:
        if (info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
                and info.path.rstrip("/") not in kept):
            fs.delete_dir(info.path)
            removed.append(info.path)
    return removed
