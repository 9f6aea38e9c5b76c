#!/usr/bin/env bash
# Every benchmark in the README, in one go: the bare model, the Engine over worker processes,
# and the HTTP server under the streaming load generator. Results land in bench/ (JSON + the
# HTTP plot); the tables are printed. Run it on a quiet machine: the numbers are medians of
# wall-clock rates, and another busy process on the same cores shows up in them.
#   pip install -e '.[bench]' && scripts/bench.sh
# With LLAMA_SERVER=/path/to/llama-server (built by you; llama.cpp is not a dependency) it also
# runs the side-by-side with llama-server (bench compare), after the HTTP server has stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-bench}
port=${BENCH_PORT:-18080}
mkdir -p "$out"

echo "== machine"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"

echo "== bench model (one core)"
tinyllm-trio bench model --runs 5 --json "$out/model.json"

echo "== bench engine (worker processes vs the bare batcher loop)"
tinyllm-trio bench engine --runs 3 --json "$out/engine.json"

echo "== bench http (tinyllm-trio serve, 2 workers, streaming /v1/completions)"
tinyllm-trio serve --port "$port" --workers 2 --access-log false --log-level warning &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
done
tinyllm-trio bench http --url "http://127.0.0.1:$port" --json "$out/http.json" --plot "$out/http.png" \
    --compare-engine --rounds 3 --server-pid "$server"
kill -INT "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
trap - EXIT

if [ -n "${LLAMA_SERVER:-}" ]; then
    echo "== bench compare (llama-server vs tinyllm-trio serve, alternated)"
    tinyllm-trio bench compare --llama-server "$LLAMA_SERVER" --rounds 3 \
        --json "$out/compare.json" --plot "$out/compare.png"
fi
