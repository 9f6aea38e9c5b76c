#!/usr/bin/env bash
# The most a second worker can add on this machine, measured without IPC or a server: two bare
# model processes decoding batch B/2 each at once, against one decoding batch B alone, each on
# a core of its own (taskset, when there are two). `bench engine`'s "2w/1w" reads against it.
# Alternates the two ROUNDS times (the machine drifts) and prints each ratio and the median.
#   ROUNDS=5 BATCH=32 [MODEL=checkpoint-dir] scripts/scaling_ceiling.sh
set -euo pipefail
rounds=${ROUNDS:-3}
big=${BATCH:-32}
half=$((big / 2))
model=()
if [ -n "${MODEL:-}" ]; then model=(--model "$MODEL"); fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
read -r low high < <(python3 -c "import os; c = sorted(os.sched_getaffinity(0)); print(c[0], c[-1])")
on() { if [ "$low" != "$high" ] && command -v taskset >/dev/null; then taskset -c "$@"; else "${@:2}"; fi; }
bench() { on "$1" tinyllm-trio bench model "${model[@]}" --runs 3 "${@:2}" >/dev/null; }
rate() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['decode'][sys.argv[2]])" "$@"; }
ratios=()
echo "round  one process, batch $big  two processes, batch $half each  two/one"
for r in $(seq 1 "$rounds"); do
    bench "$high" --batches "$big" --json "$tmp/one.json"
    bench "$low" --batches "$half" --json "$tmp/a.json" &
    bench "$high" --batches "$half" --json "$tmp/b.json"
    wait
    one=$(rate "$tmp/one.json" "$big")
    two=$(python3 -c "print($(rate "$tmp/a.json" "$half") + $(rate "$tmp/b.json" "$half"))")
    ratio=$(python3 -c "print(f'{$two / $one:.2f}')")
    ratios+=("$ratio")
    printf '%5d  %22.0f  %31.0f  %7s\n' "$r" "$one" "$two" "$ratio"
done
python3 -c "import statistics,sys; print('median two/one:', statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}"
