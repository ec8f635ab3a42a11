#!/usr/bin/env bash
# Installs channels-nats 0.10.1 (a Channels layer on a NATS server, the fastest peer
# `channels-broker bench` compares with) into the virtualenv whose python is $1
# (default: .venv/bin/python). The bench adds its column when the package imports and
# a NATS server answers at --nats-url (nats://127.0.0.1:4222 by default).
# It asks for Python >= 3.12 only because two method signatures use PEP 695 generics;
# this rewrites those two lines in the 3.11 spelling, nothing else. A NATS server for
# the bench: `apt-get install nats-server`, then `nats-server -a 127.0.0.1 -p 4222 &`.
set -euo pipefail
PY=${1:-.venv/bin/python}
"$PY" -m pip install --quiet --ignore-requires-python "channels-nats==0.10.1" "nats-py>=2.6"
f=$("$PY" -c "import importlib.util as u; print(u.find_spec('channels_nats').submodule_search_locations[0])")/layer.py
sed -i \
  -e 's/async def _within_deadline\[T\](self, command: t.Awaitable\[T\]) -> T:/async def _within_deadline(self, command: t.Awaitable[t.Any]) -> t.Any:/' \
  -e 's/async def _keeping_cancellation\[T\](self, command: t.Awaitable\[T\]) -> T:/async def _keeping_cancellation(self, command: t.Awaitable[t.Any]) -> t.Any:/' \
  "$f"
"$PY" -c "import django; from django.conf import settings; settings.configure(); import channels_nats; print('channels-nats', channels_nats.__name__, 'importable')"
