#!/usr/bin/env bash
# The docker-compose.yaml topology, run natively against a local PostgreSQL
# and Redis: migrate (once) -> bootstrap (once) -> Celery worker + gunicorn api.
#
#   scripts/stack.sh up       start everything, wait for /ready (exit 1 if it never is)
#   scripts/stack.sh down     SIGTERM (graceful: in-flight calls finish), then wait
#   scripts/stack.sh status   what runs; exit 0 when all is up, 3 otherwise
#
# Configuration: the same KEY=VALUE format as .env.example. STACK_ENV_FILE names
# the file; by default .env.native if it exists, else a copy of .env.example
# with the compose host names (postgres, redis) pointed at 127.0.0.1.
# Variables already set in the environment win over the file, e.g.
#   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/mydb PORT=5055 scripts/stack.sh up
#
# Other knobs: BIN (virtualenv bin dir, default .venv/bin), STACK_RUN_DIR (pid
# files and logs, default run/stack), STACK_WORKER (auto|on|off; auto starts the
# worker when `model-api worker` exists), STACK_READY_TIMEOUT (s, default 180),
# STACK_STOP_TIMEOUT (s, default 330: longer than gunicorn's graceful_timeout),
# STACK_CONNECT_TIMEOUT (s, default 30: wait for PostgreSQL and Redis to listen),
# STACK_PROXY (auto|on|off; auto puts nginx in front of gunicorn when nginx is
# installed, as compose's `proxy` service does: gunicorn then listens on PORT+1
# and only nginx, on PORT, talks to clients; see deploy/nginx.conf.template).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"
RUN_DIR="${STACK_RUN_DIR:-$ROOT/run/stack}"
READY_TIMEOUT="${STACK_READY_TIMEOUT:-180}"
STOP_TIMEOUT="${STACK_STOP_TIMEOUT:-330}"
CONNECT_TIMEOUT="${STACK_CONNECT_TIMEOUT:-30}"
STACK_WORKER="${STACK_WORKER:-auto}"
STACK_PROXY="${STACK_PROXY:-auto}"
COMPONENTS=(worker api proxy)

log() { printf 'stack: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- configuration ----------------------------------------------------------
env_file() {
  if [[ -n "${STACK_ENV_FILE:-}" ]]; then
    [[ -f "$STACK_ENV_FILE" ]] || die "STACK_ENV_FILE=$STACK_ENV_FILE does not exist"
    printf '%s\n' "$STACK_ENV_FILE"
  elif [[ -f "$ROOT/.env.native" ]]; then
    printf '%s\n' "$ROOT/.env.native"
  else
    mkdir -p "$RUN_DIR"
    sed -e 's#@postgres:#@127.0.0.1:#g' -e 's#://redis:#://127.0.0.1:#g' \
      "$ROOT/.env.example" >"$RUN_DIR/env.native"
    printf '%s\n' "$RUN_DIR/env.native"
  fi
}

# Export KEY=VALUE lines the way compose's env_file reads them (literal values,
# comments and blank lines skipped), without overriding the caller's environment.
load_env() {
  local file="$1" line key value
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%$'\r'}"
    [[ -z "${line//[[:space:]]/}" || "$line" =~ ^[[:space:]]*# ]] && continue
    [[ "$line" == *=* ]] || die "$file: not KEY=VALUE: $line"
    key="${line%%=*}"
    value="${line#*=}"
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$file: bad variable name: $key"
    if [[ -z "${!key+set}" ]]; then
      export "$key=$value"
    fi
  done <"$file"
}

api_port() {
  if [[ -n "${BIND:-}" ]]; then printf '%s\n' "${BIND##*:}"; else printf '%s\n' "${PORT:-5000}"; fi
}

# --- processes ----------------------------------------------------------------
# A pid file holds "PID STARTTIME": the kernel's start time of the process
# (/proc/PID/stat field 22), which exec does not change and a reused pid
# cannot share. (Matching the command line instead raced with exec: a process
# checked before it had exec'd still showed this script's command line and was
# taken for dead, stopping the stack with an empty log.)
proc_start() {  # pid -> its start time; nothing when it does not exist or is a zombie
  local stat rest
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  rest="${stat##*) }"  # fields after "pid (comm) ": state is the 1st, starttime the 20th
  # shellcheck disable=SC2086
  set -- $rest
  [[ "$1" == Z || "$1" == X ]] || printf '%s\n' "${20}"
}

pid_of() {
  local f="$RUN_DIR/$1.pid" pid rest
  if [[ -f "$f" ]]; then read -r pid rest <"$f"; echo "$pid"; fi
}

# alive and still ours (a pid file can outlive its process and the pid be reused)
running() {
  local f="$RUN_DIR/$1.pid" pid started
  [[ -f "$f" ]] || return 1
  read -r pid started <"$f"
  [[ -n "$pid" && -n "$started" && "$(proc_start "$pid")" == "$started" ]]
}

start_bg() {  # name command...
  local name="$1" pid; shift
  # setsid: its own session, so a Ctrl-C in the calling shell does not reach it
  setsid "$@" >>"$RUN_DIR/$name.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid $(proc_start "$pid")" >"$RUN_DIR/$name.pid"
  log "$name started (pid $pid, log $RUN_DIR/$name.log)"
}

# the last lines of a step's log, then one sentence saying which step failed and why
step_failed() {  # step log-file [what to do]
  local step="$1" file="$2" hint="${3:-}" reason
  if [[ -s "$file" ]]; then
    log "--- last lines of $file"
    tail -n 15 "$file" >&2
    log "---"
    reason="$(grep -v '^[[:space:]]*$' "$file" | tail -n 1)"
    die "$step failed: ${reason#Error: }${hint:+ ($hint)}"
  fi
  die "$step failed and wrote nothing to $file${hint:+ ($hint)}"
}

http_status() {  # prints the HTTP status of GET $1, 0 when nothing answers
  "$BIN/python" - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception:
    print(0)
PY
}

wait_for_tcp() {  # url-ish "scheme://user@host:port/..." with a default port
  local url="$1" default_port="$2" hostport host port
  hostport="$(printf '%s' "$url" | sed -E 's#^[a-z+]+://([^@/]*@)?([^/?]*).*#\2#')"
  host="${hostport%:*}"; port="${hostport##*:}"
  [[ "$hostport" == *:* ]] || { host="$hostport"; port="$default_port"; }
  for _ in $(seq 1 "$CONNECT_TIMEOUT"); do
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && return 0
    sleep 1
  done
  die "$3 is not reachable at $host:$port after $CONNECT_TIMEOUT s ($4): start it there, or set $4"
}

worker_available() { "$BIN/model-api" worker --help >/dev/null 2>&1; }

nginx_bin() { command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true; }

proxy_wanted() {
  case "$STACK_PROXY" in
    on) [[ -n "$(nginx_bin)" ]] || die "STACK_PROXY=on but nginx is not installed (apt-get install nginx-light)"; return 0 ;;
    auto) [[ -n "$(nginx_bin)" ]] ;;
    off) return 1 ;;
    *) die "STACK_PROXY must be auto, on or off" ;;
  esac
}

start_proxy() {  # listen upstream
  local prefix="$RUN_DIR/nginx"
  mkdir -p "$prefix"
  sed -e "s#\${LISTEN}#$1#g" -e "s#\${UPSTREAM}#$2#g" -e "s#\${PREFIX}#$prefix#g" \
    "$ROOT/deploy/nginx.conf.template" >"$prefix/nginx.conf"
  "$(nginx_bin)" -t -c "$prefix/nginx.conf" -p "$prefix" >"$RUN_DIR/proxy.log" 2>&1 \
    || step_failed "proxy (nginx rejected its configuration)" "$RUN_DIR/proxy.log"
  start_bg proxy "$(nginx_bin)" -c "$prefix/nginx.conf" -p "$prefix" -g "daemon off;"
}

# --- commands -------------------------------------------------------------------
cmd_up() {
  [[ -x "$BIN/gunicorn" ]] || die "no gunicorn in $BIN (run make install, or set BIN)"
  mkdir -p "$RUN_DIR"
  local file; file="$(env_file)"
  load_env "$file"
  log "configuration from $file (environment overrides it)"
  if running api; then
    log "already running (api pid $(pid_of api))"
    cmd_status
    return
  fi

  # what compose's healthchecks and depends_on give the containers
  case "${DATABASE_URL:-}" in
    postgres*) wait_for_tcp "$DATABASE_URL" 5432 PostgreSQL DATABASE_URL ;;
  esac
  if [[ -n "${CELERY_BROKER_URL:-}" ]]; then wait_for_tcp "$CELERY_BROKER_URL" 6379 Redis CELERY_BROKER_URL; fi

  # each step's log starts empty, so its last lines are this run's
  log "migrate"
  "$BIN/model-api" db upgrade >"$RUN_DIR/migrate.log" 2>&1 || step_failed migrate "$RUN_DIR/migrate.log"
  log "bootstrap (first user; a generated password is in $RUN_DIR/bootstrap.log)"
  "$BIN/model-api" bootstrap >"$RUN_DIR/bootstrap.log" 2>&1 || step_failed bootstrap "$RUN_DIR/bootstrap.log"
  : >"$RUN_DIR/worker.log"
  : >"$RUN_DIR/api.log"

  case "$STACK_WORKER" in
    on) start_bg worker "$BIN/model-api" worker ;;
    auto)
      if worker_available; then
        start_bg worker "$BIN/model-api" worker
      else
        log "worker skipped: this build has no 'model-api worker' (jobs run in the api process)"
        rm -f "$RUN_DIR/worker.pid"
      fi ;;
    off) rm -f "$RUN_DIR/worker.pid" ;;
    *) die "STACK_WORKER must be auto, on or off" ;;
  esac

  local port; port="$(api_port)"
  if proxy_wanted; then
    # slow clients meet nginx, never a gunicorn thread (deploy/nginx.conf.template)
    : >"$RUN_DIR/proxy.log"
    BIND="127.0.0.1:$((port + 1))" TRUSTED_PROXIES=1 \
      start_bg api "$BIN/gunicorn" -c python:model_api.gunicorn_conf model_api.wsgi:app
    local host="127.0.0.1"
    [[ -z "${BIND:-}" ]] || host="${BIND%:*}"
    start_proxy "$host:$port" "127.0.0.1:$((port + 1))"
  else
    rm -f "$RUN_DIR/proxy.pid"
    start_bg api "$BIN/gunicorn" -c python:model_api.gunicorn_conf model_api.wsgi:app
  fi
  echo "http://127.0.0.1:$port" >"$RUN_DIR/api.url"

  local url deadline=$((SECONDS + READY_TIMEOUT)) code=0
  url="http://127.0.0.1:$(api_port)/ready"
  local status
  while ((SECONDS < deadline)); do
    for name in "${COMPONENTS[@]}"; do
      if [[ -f "$RUN_DIR/$name.pid" ]] && ! running "$name"; then
        # our child: wait gives its exit status
        status=0; wait "$(pid_of "$name")" 2>/dev/null || status=$?
        cmd_down
        step_failed "$name (exited during start-up with status $status)" "$RUN_DIR/$name.log"
      fi
    done
    code="$(http_status "$url")"
    if [[ "$code" == 200 ]]; then
      log "ready at http://127.0.0.1:$(api_port)"
      return 0
    fi
    sleep 0.5
  done
  cmd_down
  step_failed "api (not ready after ${READY_TIMEOUT}s; last /ready status: $code)" "$RUN_DIR/api.log" \
    "raise STACK_READY_TIMEOUT if the model is still loading"
}

cmd_down() {
  local name pid waiting deadline
  for name in "${COMPONENTS[@]}"; do
    if running "$name"; then
      pid="$(pid_of "$name")"
      log "stopping $name (pid $pid)"
      # nginx: QUIT is its graceful stop (in-flight requests finish); TERM would cut them
      if [[ "$name" == proxy ]]; then kill -QUIT "$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
    fi
  done
  deadline=$((SECONDS + STOP_TIMEOUT))
  while :; do
    waiting=()
    for name in "${COMPONENTS[@]}"; do running "$name" && waiting+=("$name"); done
    ((${#waiting[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      for name in "${waiting[@]}"; do
        log "$name still running after ${STOP_TIMEOUT}s: SIGKILL"
        kill -KILL "$(pid_of "$name")" 2>/dev/null || true
      done
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  for name in "${COMPONENTS[@]}"; do rm -f "$RUN_DIR/$name.pid"; done
  log "stopped"
}

cmd_status() {
  local name ok=0
  for name in "${COMPONENTS[@]}"; do
    if running "$name"; then
      echo "$name: running (pid $(pid_of "$name"))"
    elif [[ -f "$RUN_DIR/$name.pid" ]]; then
      echo "$name: dead (stale pid file)"; ok=3
    elif [[ "$name" == api ]]; then
      echo "$name: stopped"; ok=3
    else
      echo "$name: not started"
    fi
  done
  if running api && [[ -f "$RUN_DIR/api.url" ]]; then
    echo "url: $(cat "$RUN_DIR/api.url")"
    echo "ready: $(http_status "$(cat "$RUN_DIR/api.url")/ready") (status of GET /ready)"
  fi
  return "$ok"
}

# sourced (tests/packaging/test_stack_errors.py): define the functions only
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
