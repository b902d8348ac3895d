#!/usr/bin/env bash
# Reproduces docs/reports/policy-comparison.md: round_robin vs cache_aware through `prefixgate serve`
# with 2 engine workers, on a scaled-down shared-prefix workload and on multi-turn chat.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${OUT:-docs/reports/policy-comparison}
PORT=${PORT:-8090}
export PREFIXGATE_ADMIN_KEY=${PREFIXGATE_ADMIN_KEY:-report-$RANDOM$RANDOM}
prefixgate serve --workers 2 --port "$PORT" >"${TMPDIR:-/tmp}/policy-report-serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
for _ in $(seq 150); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 2; done
python -m loadgen --base-url "http://127.0.0.1:$PORT" --compare-policies round_robin,cache_aware \
  --workload shared-prefix --gsp-num-groups 12 --gsp-prompts-per-group 4 --gsp-system-prompt-len 512 \
  --gsp-question-len 32 --gsp-output-len 16 --concurrency 4 --seed 1 --output-dir "$OUT/shared-prefix"
python -m loadgen --base-url "http://127.0.0.1:$PORT" --compare-policies round_robin,cache_aware \
  --workload multi-turn --mt-num-conversations 8 --mt-turns 4 --mt-system-prompt-len 256 \
  --mt-user-turn-len 32 --mt-output-len 24 --think-time 0.5 --concurrency 4 --seed 1 \
  --output-dir "$OUT/multi-turn"
