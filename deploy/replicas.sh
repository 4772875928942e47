#!/usr/bin/env bash
# Two kvserve replicas sharing one Redis for their KV blocks, behind the SGLang model gateway
# with its cache-aware policy. Everything on this machine; stop it all with Ctrl-C.
#   pip install smg            # the gateway (a Rust binary on PyPI)
#   apt-get install redis-server   (or valkey-server)
set -euo pipefail
REDIS_PORT=${REDIS_PORT:-6379}
# Eviction is the store's: give it a memory cap and least-recently-used eviction.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --maxmemory "${REDIS_MEMORY:-2gb}" --maxmemory-policy allkeys-lru &
trap 'kill $(jobs -p) 2>/dev/null' EXIT
for port in 8001 8002; do
    kvserve serve --host 127.0.0.1 --port "$port" --kv-remote "redis://127.0.0.1:$REDIS_PORT" &
done
until curl -sf localhost:8001/health >/dev/null && curl -sf localhost:8002/health >/dev/null; do
    sleep 1
done
smg launch --host 0.0.0.0 --port 8000 --policy cache_aware \
    --worker-urls http://127.0.0.1:8001 http://127.0.0.1:8002
