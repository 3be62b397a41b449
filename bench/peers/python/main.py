"""The benchmark's Python peer: what a hand-written Cloud Function for CMC's Event Webhook
looks like (functions-framework, as CMC's blog sets one up, and nats-py), turning each
batch into one core NATS message per event on `<prefix>.<event_type>.<status>`.

It publishes in core mode (no JetStream acknowledgement, no spool, no validation beyond
what indexing the JSON needs), so it is an upper bound for such a function. Run by
`scripts/bench --peers`:

    NATS_URL=nats://127.0.0.1:4222 SUBJECT_PREFIX=peer \
        functions-framework --target cmc --source bench/peers/python/main.py --port 8080
"""

import asyncio
import hashlib
import json
import os
import threading

import functions_framework
import nats
from flask import jsonify

_PREFIX = os.environ.get("SUBJECT_PREFIX", "cmc")
_lock = threading.Lock()
_loop = None
_client = None


def _connection():
    """One NATS connection per worker process, on an event loop of its own thread
    (gunicorn forks the worker after the module is imported)."""
    global _loop, _client
    with _lock:
        if _client is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True).start()
            _client = asyncio.run_coroutine_threadsafe(
                nats.connect(os.environ["NATS_URL"]), _loop
            ).result()
    return _loop, _client


async def _publish(client, messages):
    for subject, headers, body in messages:
        await client.publish(subject, body, headers=headers)


@functions_framework.http
def cmc(request):
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        return jsonify({"error": "invalid body"}), 400
    event_type = data.get("event_type")
    event = data.get("event")
    if isinstance(event, str):
        event = json.loads(event)
    entries = (event or {}).get(event_type)
    if not isinstance(entries, list):
        return jsonify({"error": "no events"}), 400
    batch_id = request.headers.get("X-Request-Id", "")
    messages = []
    for index, entry in enumerate(entries):
        body = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            "Nats-Msg-Id": hashlib.sha256(body).hexdigest(),
            "Cmc-Event-Type": event_type,
            "Cmc-Status": str(entry.get("status", "")),
            "Cmc-Batch-Id": batch_id,
            "Cmc-Batch-Index": str(index),
        }
        messages.append((f"{_PREFIX}.{event_type}.{entry.get('status', '')}", headers, body))
    loop, client = _connection()
    asyncio.run_coroutine_threadsafe(_publish(client, messages), loop).result()
    return jsonify({"result": "ok", "published": len(messages)})
