#!/usr/bin/env bash
# The quickstart on a running Ray cluster, through `ray job submit`: a first job writes the
# synthetic shards into a shared directory, a second trains from them and writes its run there.
#
#   bash jobs/submit_quickstart.sh SHARED_DIR [raycmr train overrides ...]
#   bash jobs/submit_quickstart.sh /mnt/shared/raycmr train.num_workers=4 train.use_gpu=true
#
# SHARED_DIR (or RAYCMR_SHARED_DIR): an ABSOLUTE path that every node of the cluster can read and
# write (NFS, a mounted bucket; any local directory when all nodes run on one machine, as with
# cluster/local_multinode.sh). Every path handed to the jobs is absolute: under a job a relative
# path resolves inside Ray's temporary copy of the working dir (deleted with the job; and
# jobs/runtime_env.yaml does not ship out/), so raycmr refuses a relative train.storage_path.
#
# Environment (defaults in brackets):
#   RAY_DASHBOARD_ADDRESS [http://127.0.0.1:8265]  the head node's dashboard (job server)
#   RAY_AUTH_MODE [token when ~/.ray/auth_token exists]  Ray 2.60 clusters started with token
#       auth refuse clients without it (AuthenticationError); the token is ~/.ray/auth_token
#       or RAY_AUTH_TOKEN, as on the head
#   RAYCMR_TRAIN_ROWS [4000] RAYCMR_EVAL_ROWS [500]  synthetic shard sizes
#   RAYCMR_RUN_NAME [quickstart-<date>-<time>]  the run folder: SHARED_DIR/runs/NAME
#   RAYCMR_WORKER_RESOURCES ['']  custom resources per training worker, e.g. '{raycmr_worker: 1}'
#       on cluster/local_multinode.sh (one training worker per node)
#   RAYCMR_SUBMIT_ARGS ['']  extra `ray job submit` options (e.g. --no-wait)
set -euo pipefail

die() { echo "submit_quickstart: $*" >&2; exit 2; }

SHARED="${1:-${RAYCMR_SHARED_DIR:-}}"
[[ $# -gt 0 ]] && shift
[[ -n "$SHARED" ]] || die "give the shared directory: bash jobs/submit_quickstart.sh /abs/shared/dir (or set RAYCMR_SHARED_DIR)"
[[ "$SHARED" == /* || "$SHARED" == *://* ]] || die "'$SHARED' is relative: give an absolute path that every node of the cluster shares"
SHARED="${SHARED%/}"

ADDRESS="${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}"
if [[ -z "${RAY_AUTH_MODE:-}" && ( -s "$HOME/.ray/auth_token" || -n "${RAY_AUTH_TOKEN:-}" ) ]]; then
  export RAY_AUTH_MODE=token
fi
TRAIN_ROWS="${RAYCMR_TRAIN_ROWS:-4000}"
EVAL_ROWS="${RAYCMR_EVAL_ROWS:-500}"
NAME="${RAYCMR_RUN_NAME:-quickstart-$(date +%Y%m%d-%H%M%S)}"
command -v ray >/dev/null || die "'ray' not found: activate the environment that has raycmr installed"

cd "$(dirname "$0")/.."   # jobs/runtime_env.yaml ships the working dir "." = the repository
# Only the job server's address travels: a RAY_ADDRESS left for a driver would win over --address.
unset RAY_ADDRESS
# shellcheck disable=SC2206
EXTRA=(${RAYCMR_SUBMIT_ARGS:-})
submit() {
  ray job submit --address "$ADDRESS" --runtime-env jobs/runtime_env.yaml "${EXTRA[@]}" -- "$@"
}

echo "[submit_quickstart] shards -> $SHARED/shards ($TRAIN_ROWS train, $EVAL_ROWS val/test rows)"
submit raycmr shards synthetic --out "$SHARED/shards" --train "$TRAIN_ROWS" \
  --val "$EVAL_ROWS" --test "$EVAL_ROWS" --seed 0 --overwrite

overrides=(
  "data.train=[$SHARED/shards/train]" "data.val=[$SHARED/shards/val]"
  "data.test=[$SHARED/shards/test]"
  "train.storage_path=$SHARED/runs" "train.name=$NAME"
)
[[ -n "${RAYCMR_WORKER_RESOURCES:-}" ]] && overrides+=("train.worker_resources=$RAYCMR_WORKER_RESOURCES")
echo "[submit_quickstart] training -> $SHARED/runs/$NAME"
submit raycmr train --config quickstart "${overrides[@]}" "$@"
