#!/usr/bin/env bash
# Before/after in one run: the stream-path, same-host and lookup benchmarks of two checkouts,
# interleaved (A, B, A, B) on the same machine so that both see the same noise.
#   bash bench/compare_checkouts.sh OLD_DIR OLD_PYTHON NEW_DIR NEW_PYTHON [rounds]
# Each checkout runs its own bench/ scripts with its own interpreter; raw outputs go to
# bench/results/compare-<name>-<round>-<label>.txt in the NEW checkout.
set -euo pipefail
OLD=$1 OLDPY=$2 NEW=$3 NEWPY=$4 ROUNDS=${5:-2}
OUTDIR="$NEW/bench/results"
mkdir -p "$OUTDIR"
run() {  # label dir python script args...
  local label=$1 dir=$2 py=$3 script=$4; shift 4
  (cd "$dir" && HF_HUB_OFFLINE=1 "$py" "bench/$script" "$@") > "$OUTDIR/compare-${script%.py}-$r-$label.txt" 2>&1 \
    || echo "FAILED: $label $script (see $OUTDIR/compare-${script%.py}-$r-$label.txt)"
}
for r in $(seq 1 "$ROUNDS"); do
  for pair in "before $OLD $OLDPY" "after $NEW $NEWPY"; do
    set -- $pair
    run "$1" "$2" "$3" daemon_throughput.py --repeats 3
    run "$1" "$2" "$3" local_path.py --repeats 3
    run "$1" "$2" "$3" lookup_rate.py --seconds 3
  done
done
for f in "$OUTDIR"/compare-*.txt; do echo "=== $(basename "$f")"; tail -n 12 "$f"; done
