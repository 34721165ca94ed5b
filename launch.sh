#!/usr/bin/env bash
# Wan2.1 text-to-video launcher (./launch.sh --help lists every flag, the launcher's and app.py's).
#   ./launch.sh [app flags]          create .venv on first use, then start the app on every visible GPU
#   ./launch.sh test [pytest args]   same environment plus test extras, run the test suite on CPU
# Launcher flags: --no-venv (or LAUNCH_NO_VENV=1) uses the current python3; --nproc N overrides the
# number of ranks; --nnodes/--node_rank/--master_addr/--master_port/--rdzv_endpoint for several nodes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

log() { echo "[launch] $*" >&2; }

NO_VENV="${LAUNCH_NO_VENV:-0}"
MODE=run
if [[ "${1:-}" == "test" ]]; then MODE=test; shift; fi

# ---- launcher-only flags (everything else goes to app.py untouched) -------------------------------
NPROC=""; NNODES=1; NODE_RANK=0; RDZV_ENDPOINT=""; MAX_RESTARTS="${LAUNCH_MAX_RESTARTS:-3}"
APP_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-venv|--no_venv) NO_VENV=1; shift ;;
    --nproc|--nproc_per_node|--nproc-per-node) NPROC="$2"; shift 2 ;;
    --nproc=*|--nproc_per_node=*) NPROC="${1#*=}"; shift ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node_rank|--node-rank) NODE_RANK="$2"; shift 2 ;;
    --master_addr|--master-addr) export MASTER_ADDR="$2"; shift 2 ;;
    --master_port|--master-port) export MASTER_PORT="$2"; shift 2 ;;
    --rdzv_endpoint|--rdzv-endpoint) RDZV_ENDPOINT="$2"; shift 2 ;;
    --max_restarts|--max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    *) APP_ARGS+=("$1"); shift ;;
  esac
done

# The browser tests (tests/test_browser.py) drive Chromium at /usr/bin/chromium: say so before a long run fails.
browser_tests_selected() {  # the whole suite, tests/, or tests/test_browser.py named (and not --ignore'd)
  local a prev="" named=0 picked=0
  for a in "${APP_ARGS[@]}"; do
    case "$prev:$a" in
      --ignore:tests/test_browser.py|*:--ignore=tests/test_browser.py) return 1 ;;
      --ignore:*|--deselect:*|-k:*|-m:*|-p:*|-c:*|-o:*|--rootdir:*) ;;
      *:tests|*:tests/|*:./tests|*:./tests/|*:tests/test_browser.py*) named=1; picked=1 ;;
      *:-*) ;;
      *) named=1 ;;
    esac
    prev="$a"
  done
  [[ "$named" == 0 || "$picked" == 1 ]]
}
CHROMIUM="${LAUNCH_CHROMIUM:-/usr/bin/chromium}"  # the path tests/test_browser.py uses (overridable for a test)
if [[ "$MODE" == test ]] && browser_tests_selected && [[ ! -x "$CHROMIUM" ]]; then
  found="$(command -v chromium chromium-browser google-chrome 2>/dev/null | head -1 || true)"
  echo "[launch] the browser tests (tests/test_browser.py) need Chromium at $CHROMIUM, which is missing${found:+ (found $found, which they do not use)}." >&2
  echo "[launch] install it: sudo apt-get install -y chromium   (Debian; Ubuntu: the chromium snap or Debian's package)" >&2
  echo "[launch] or run the rest: ./launch.sh test --ignore=tests/test_browser.py" >&2
  exit 2
fi

# ---- environment ----------------------------------------------------------------------------------
VENV="${WAN_VENV:-$ROOT/.venv}"
if [[ "$MODE" == run ]]; then
  for a in "${APP_ARGS[@]}"; do
    if [[ "$a" == -h || "$a" == --help ]]; then  # app.py's parser needs no packages: no venv set-up for --help
      if [[ -x "$VENV/bin/python" ]]; then exec "$VENV/bin/python" app.py --help; fi
      exec "${PYTHON:-python3}" app.py --help
    fi
  done
fi
REQ=requirements.txt
[[ "$MODE" == test ]] && REQ=requirements-test.txt
req_hash() { cat requirements.txt "$1" | sha256sum | cut -c1-16; }

ensure_venv() {
  local want stamp="$VENV/.requirements-$(basename "$REQ" .txt)"
  want="$(req_hash "$REQ")"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  local py="${PYTHON:-python3}"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "Python 3.10+ is needed (found $("$py" --version 2>&1)); set PYTHON=/path/to/python3.10+" >&2; exit 2; }
  log "setting up $VENV from $REQ (first run only)"
  [[ -x "$VENV/bin/python" ]] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -r "$REQ" >&2
  echo "$want" > "$stamp"
}

if [[ "$NO_VENV" == 1 ]]; then
  PY="$(command -v python3)"
else
  ensure_venv
  PY="$VENV/bin/python"
fi

if [[ "$MODE" == test ]]; then
  export CUDA_VISIBLE_DEVICES="${TEST_CUDA_VISIBLE_DEVICES-}"   # the suite runs on CPU
  # pytest's testpaths (pyproject.toml) is tests/: the whole suite without arguments, only what is named otherwise
  exec "$PY" -m pytest "${APP_ARGS[@]}"
fi

# Few malloc arenas: the web server runs requests on many short-lived threads, and glibc's default (8 per
# core) keeps each one's freed memory; 2 keeps the server's RSS flat (docs/RELIABILITY.md). Override by setting it.
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"

# Check app.py's flags once, in a fraction of a second (no torch, no model): a bad one is reported once,
# before torch is imported to count the GPUs, and torchrun never restarts a gang for it.
WAN_CHECK_FLAGS=1 "$PY" app.py "${APP_ARGS[@]}" || exit $?

# ---- how many ranks --------------------------------------------------------------------------------
if [[ -z "$NPROC" ]]; then
  NPROC="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 1)' 2>/dev/null || echo 1)"
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then echo "--nproc must be a positive integer, got '$NPROC'" >&2; exit 2; fi

HEADLESS=0
for a in "${APP_ARGS[@]}"; do [[ "$a" == --prompt || "$a" == --prompt=* ]] && HEADLESS=1; done
if [[ "$NPROC" == 1 && "$NNODES" == 1 && ( "$HEADLESS" == 1 || "$MAX_RESTARTS" == 0 ) ]]; then
  exec "$PY" app.py "${APP_ARGS[@]}"  # one headless run: no restarts (a failed run must not run again)
fi

# ---- torchrun gang ---------------------------------------------------------------------------------
RUN=("$PY" -m torch.distributed.run --nproc_per_node="$NPROC" --max_restarts="$MAX_RESTARTS")
if [[ "$NNODES" != 1 && -n "$RDZV_ENDPOINT" ]]; then
  # elastic c10d rendezvous; a node that is slow to start is waited for up to LAUNCH_JOIN_TIMEOUT seconds
  RUN+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-wan21}"
        --rdzv_conf="join_timeout=${LAUNCH_JOIN_TIMEOUT:-600}")
elif [[ "$NNODES" != 1 ]]; then
  # static rendezvous at MASTER_ADDR:MASTER_PORT (node 0's address); --node_rank fixes each node's ranks
  RUN+=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_ADDR:-}" || -n "${MASTER_PORT:-}" || -n "$RDZV_ENDPOINT" ]]; then
  ENDPOINT="${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}"
  RUN+=(--rdzv_backend=c10d --rdzv_endpoint="$ENDPOINT" --rdzv_id="${RDZV_ID:-wan21}")
else
  RUN+=(--standalone)
fi
log "starting $NPROC rank(s) per node x $NNODES node(s) with torchrun (restarts up to $MAX_RESTARTS)"
exec "${RUN[@]}" app.py "${APP_ARGS[@]}"
