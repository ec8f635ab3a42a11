#!/usr/bin/env bash
# Runs the notifications example: a channels-broker daemon, the background worker
# (manage.py runworker) and Daphne serving the site.
#   deploy/examples/notifications/run.sh        (or: make example)
# then open http://127.0.0.1:8000/ and log in as alice or bob (password channels-demo).
# Environment: BROKER_BACKEND (memory://), BROKER_PORT (7733), HTTP_PORT (8000).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
# Use the project's virtualenv when there is one, else whatever is on PATH.
if [ -x "$root/.venv/bin/python" ]; then PATH="$root/.venv/bin:$PATH"; fi

backend="${BROKER_BACKEND:-memory://}"
broker_port="${BROKER_PORT:-7733}"
http_port="${HTTP_PORT:-8000}"
export CHANNELS_BROKER_URL="tcp://127.0.0.1:$broker_port"

cd "$here"
python manage.py migrate --noinput

channels-broker serve --listen "127.0.0.1:$broker_port" --backend "$backend" --metrics-listen off &
broker_pid=$!
python manage.py runworker notifications-worker &
worker_pid=$!
trap 'kill "$worker_pid" "$broker_pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

echo "Open http://127.0.0.1:$http_port/ and log in as alice or bob (password channels-demo)."
daphne -b 127.0.0.1 -p "$http_port" notifications_site.asgi:application
