#!/usr/bin/env bash
# Run a QShield sweep on a SLURM allocation through a private, token-authenticated Ray cluster.
#
#   sbatch slurm/run.sh [SWEEP.yaml] [extra `python -m qshield_dist.launch` args]
#   sbatch --nodes=4 --cpus-per-task=32 --gres=gpu:4 --time=12:00:00 slurm/run.sh sweeps/full.yaml
#
# The #SBATCH lines below are defaults; options given to sbatch on the command line win.
# One task per node: the first node runs the Ray head (and the driver), every other node a
# Ray worker started with `srun -w NODE`. All Ray processes are stopped when the script
# exits, also on failure or scancel (trap EXIT). Each node's address is what its name
# resolves to there (getent); tests/test_slurm_cluster.py runs this on two nodes in network
# namespaces (slurm/dev-cluster.sh start-netns).
#
# Environment:
#   QSHIELD_PYTHON   python to use (default: `python` on PATH), e.g. .venv/bin/python
#   QSHIELD_RAY_DIR  where the per-job token directory goes; must be on a filesystem all
#                    nodes see (default: $HOME/.qshield/ray). The token file is 0600 in a
#                    0700 directory, reaches Ray only through RAY_AUTH_TOKEN_PATH (never
#                    argv) and is deleted at exit.
#
#SBATCH --job-name=qshield
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --output=qshield-%j.out
set -euo pipefail

SWEEP=${1:-sweeps/quick.yaml}
[[ $# -gt 0 ]] && shift
PY=${QSHIELD_PYTHON:-python}
cd "${SLURM_SUBMIT_DIR:-$PWD}"

log() { echo "[run.sh $(date +%H:%M:%S)] $*" >&2; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    log "not inside a SLURM allocation: submit with 'sbatch slurm/run.sh ...'"
    exit 2
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES[0]}
# The address other nodes reach the head at; a hostname resolving to 127.0.0.1 keeps a
# one-node cluster on loopback.
HEAD_IP=$(getent ahostsv4 "$HEAD_NODE" | awk 'NR == 1 {print $1}')
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
GPUS=$("$PY" -c 'import os; v = os.environ.get("CUDA_VISIBLE_DEVICES", ""); print(len([g for g in v.split(",") if g]) if v else 0)')

RAY_DIR=${QSHIELD_RAY_DIR:-$HOME/.qshield/ray}/$SLURM_JOB_ID
RAY_TMP=/tmp/qshield-ray-$SLURM_JOB_ID  # the head's session files (node-local)
mkdir -p "$RAY_DIR"
chmod 700 "$RAY_DIR" "$(dirname "$RAY_DIR")"
TOKEN=$("$PY" -m qshield_dist.cluster token "$RAY_DIR/auth")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN RAY_USAGE_STATS_ENABLED=0
LOOPBACK=0
"$PY" -m qshield_dist.cluster is-loopback "$HEAD_IP" && LOOPBACK=1
[[ $LOOPBACK == 1 ]] && export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    log "stopping ray (exit code $rc)"
    # SIGTERM: `python -m qshield_dist.cluster` stops its node (and srun forwards it).
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$RAY_DIR" "$RAY_TMP"
    exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

log "job $SLURM_JOB_ID: nodes ${NODES[*]}; head $HEAD_NODE ($HEAD_IP); $CPUS cpus, $GPUS gpus per node"
"$PY" -m qshield_dist.cluster head --token-file "$TOKEN" --ip "$HEAD_IP" --num-cpus "$CPUS" \
    --num-gpus "$GPUS" --temp-dir "$RAY_TMP" --address-file "$RAY_DIR/address" &
PIDS+=($!)
for _ in $(seq 180); do
    [[ -s $RAY_DIR/address ]] && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { log "ray head failed to start"; exit 1; }
    sleep 1
done
[[ -s $RAY_DIR/address ]] || { log "ray head not up after 180 s"; exit 1; }
ADDRESS=$(cat "$RAY_DIR/address")
log "ray head at $ADDRESS"

for node in "${NODES[@]:1}"; do
    # Environment (RAY_AUTH_*) travels with srun (--export=ALL is the default).
    srun --nodes=1 --ntasks=1 -w "$node" --kill-on-bad-exit=0 \
        "$PY" -m qshield_dist.cluster worker --token-file "$TOKEN" --address "$ADDRESS" \
        --num-cpus "$CPUS" --num-gpus "$GPUS" &
    PIDS+=($!)
done
if [[ ${#NODES[@]} -gt 1 ]]; then
    # Wait for every worker to join before the sweep sizes its first dispatch.
    "$PY" - "$ADDRESS" "${#NODES[@]}" <<'EOF'
import sys, time
import ray
from qshield_dist import cluster
addr, want = sys.argv[1], int(sys.argv[2])
if cluster.is_loopback(addr):
    cluster.use_token_in_this_process(cluster.os.environ["RAY_AUTH_TOKEN_PATH"], loopback=True)
ray.init(address=addr, log_to_driver=False)
deadline = time.time() + 300
while len([n for n in ray.nodes() if n["Alive"]]) < want and time.time() < deadline:
    time.sleep(2)
print(f"{len([n for n in ray.nodes() if n['Alive']])}/{want} ray nodes up", file=sys.stderr)
EOF
fi

"$PY" -m qshield_dist.launch "$SWEEP" --executor ray --ray-address "$ADDRESS" "$@"
