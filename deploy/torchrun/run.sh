#!/usr/bin/env bash
# Single-node torchrun with expman.
#
#   ./run.sh [auto] [ARGS...]    nothing configured: the ranks share one collector that
#                                expman starts by itself; runs go to $EXPMAN_ROOT or ./experiments
#   ./run.sh service [ARGS...]   a collector already runs on this host (systemd/): push to
#                                $EXPMAN_COLLECTOR, default ipc:///run/expman/collector.sock
#   ./run.sh own [ARGS...]       start a collector for this job, train, stop it
#
# ARGS go to train.py (e.g. --steps 1000). NPROC ranks (default 4).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mode="auto"
case "${1:-}" in
    auto|service|own) mode="$1"; shift ;;
esac
nproc="${NPROC:-4}"
train=(torchrun --standalone --nproc_per_node="$nproc" "$here/train.py" "$@")

case "$mode" in
    auto)
        # The plain command: torchrun --nproc_per_node=4 train.py
        unset EXPMAN_COLLECTOR
        exec "${train[@]}"
        ;;
    service)
        export EXPMAN_COLLECTOR="${EXPMAN_COLLECTOR:-ipc:///run/expman/collector.sock}"
        exec "${train[@]}"
        ;;
    own)
        sock_dir="$(mktemp -d "${TMPDIR:-/tmp}/expman-XXXXXX")"
        export EXPMAN_COLLECTOR="ipc://$sock_dir/collector.sock"
        "${EXPMAN_COLLECTOR_CMD:-expman-collector}" --root "${EXPMAN_ROOT:-experiments}" \
            --bind "$EXPMAN_COLLECTOR" --ready-file "$sock_dir/ready.yaml" &
        collector=$!
        cleanup() {
            kill -TERM "$collector" 2>/dev/null && wait "$collector" || true   # it flushes and exits 0
            rm -rf "$sock_dir"
        }
        trap cleanup EXIT
        for _ in $(seq 300); do
            [ -s "$sock_dir/ready.yaml" ] && break
            kill -0 "$collector" 2>/dev/null || { echo "expman: the collector did not start" >&2; exit 1; }
            sleep 0.1
        done
        [ -s "$sock_dir/ready.yaml" ] || { echo "expman: the collector was not ready after 30 s" >&2; exit 1; }
        status=0
        "${train[@]}" || status=$?
        exit "$status"
        ;;
esac
