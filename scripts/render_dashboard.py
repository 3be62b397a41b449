"""The panels of deploy/monitoring/dashboard.json, computed from real scrapes and drawn with
matplotlib. The run also rotates the API key the way README "Rotate the CMC key" says (a
second key and a reload, the senders switch, a refused file, the old key removed and a
reload), so the reload and per-key panels show something. Run through scripts/render-dashboard,
which provides the arguments:

    render_dashboard.py BINARY NATS_SERVER OUTPUT.png
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')
STATUSES = ["queued", "succeeded", "failed", "deferred"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None):
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(probe, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.1)
    raise SystemExit("render-dashboard: a process did not come up")


def parse(page):
    """{(name, frozenset(labels)): value} of one scrape."""
    out = {}
    for line in page.splitlines():
        m = SERIES.match(line)
        if m:
            labels = frozenset(LABEL.findall(m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


class Nats:
    def __init__(self, binary, store):
        self.binary, self.store, self.port, self.proc = binary, store, free_port(), None

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return True
            except OSError:
                return False

        wait_for(up)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def traffic(url, stop, rng, sender):
    """Webhook batches until `stop` is set: mostly valid, some retried, some with invalid
    entries, a few malformed; each with the API key `sender["key"]` holds when it is sent."""
    sent = []

    def keyed(document):
        return json.dumps(dict(document, api_key=sender["key"])).encode()

    while not stop.is_set():
        kind = rng.random()
        if kind < 0.08 and sent:
            body = keyed(rng.choice(sent))  # a retry: stored once, counted as duplicates
        elif kind < 0.11:
            body = b'{"event_type":"deliveries"'  # malformed: 400
        else:
            n = min(100, max(1, int(rng.expovariate(1 / 20))))
            entries = []
            for i in range(n):
                if rng.random() < 0.01:
                    entries.append(rng.choice(["not an object", {"to": "x@example.com"}]))
                else:
                    entries.append(
                        {
                            "status": rng.choices(STATUSES, weights=[5, 4, 1, 1])[0],
                            "to": f"user{rng.randrange(10**6)}@example.com",
                            "messageId": f"<{rng.randrange(10**12)}@example.com>",
                        }
                    )
            document = {"event_type": "deliveries", "server_composition": "pro", "event": {"deliveries": entries}}
            body = keyed(document)
            if rng.random() < 0.2:
                bounces = [{"status": str(rng.choice([1, 2, 2, 3, 5, 99])), "to": "b@example.com", "n": rng.random()}]
                http("POST", url, keyed(
                    {"event_type": "bounces", "server_composition": "pro", "event": {"bounces": bounces}}
                ))
            sent.append(document)
        http("POST", url, body)
        time.sleep(rng.uniform(0.02, 0.12))


def config(auth):
    """The configuration file: `[auth]` only (everything else comes from the environment)."""
    return f"[auth]\n{auth}\n"


# The key rotation (README "Rotate the CMC key"), at these seconds of the run: the file's
# [auth] before the reload, or what changes.
ROTATION = [
    (15, "reload", 'api_key = ["key-old", "key-new"]'),
    (30, "switch", None),
    (90, "reload", 'api_key = "key-new"\nbasic_username = "half-set"'),  # refused: no password
    (100, "reload", 'api_key = "key-new"'),
]


def main():
    binary, nats_binary, output = sys.argv[1:4]
    rng = random.Random(13)
    work = tempfile.TemporaryDirectory()
    nats = Nats(nats_binary, os.path.join(work.name, "nats"))
    nats.start()
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMC_FORWARDER")}
    env.update(
        {
            "CMC_FORWARDER__SERVER__LISTEN": f"127.0.0.1:{port}",
            "CMC_FORWARDER__ADMIN__LISTEN": f"127.0.0.1:{admin}",
            "CMC_FORWARDER__NATS__SERVERS": f"nats://127.0.0.1:{nats.port}",
            "CMC_FORWARDER__NATS__PUBLISH_TIMEOUT": "1s",
            "CMC_FORWARDER__SPOOL__DIR": os.path.join(work.name, "spool"),
            "CMC_FORWARDER__VALIDATION__INVALID_ENTRIES": "dead_letter",
            "RUST_LOG": "error",
        }
    )
    config_file = os.path.join(work.name, "config.toml")

    def write_config(auth):
        with open(config_file + ".next", "w", encoding="utf-8") as f:
            f.write(config(auth))
        os.replace(config_file + ".next", config_file)

    write_config('api_key = "key-old"')
    sender = {"key": "key-old"}
    service = subprocess.Popen([binary, "--config", config_file], env=env, stdout=subprocess.DEVNULL)
    metrics_url = f"http://127.0.0.1:{admin}/metrics"
    wait_for(lambda: http("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200)

    stop = threading.Event()
    senders = [
        threading.Thread(
            target=traffic, args=(f"http://127.0.0.1:{port}/webhooks/cmc", stop, random.Random(s), sender)
        )
        for s in range(3)
    ]
    for t in senders:
        t.start()
    scrapes = []
    start = time.monotonic()
    duration, outage = 120, (45, 70)
    nats_down = False
    rotation = list(ROTATION)
    while time.monotonic() - start < duration:
        now = time.monotonic() - start
        while rotation and now >= rotation[0][0]:
            _, step, auth = rotation.pop(0)
            if step == "switch":
                sender["key"] = "key-new"
            else:
                write_config(auth)
                service.send_signal(signal.SIGHUP)
        if outage[0] <= now < outage[1] and not nats_down:
            nats.stop()
            nats_down = True
        elif now >= outage[1] and nats_down:
            nats.start()
            nats_down = False
        status, page = http("GET", metrics_url)
        if status == 200:
            scrapes.append((now, parse(page.decode())))
        time.sleep(1)
    stop.set()
    for t in senders:
        t.join()
    service.terminate()
    service.wait()
    nats.stop()
    plot(scrapes, output, outage)
    print(f"render-dashboard: {len(scrapes)} scrapes over {duration} s -> {output}")


# --------------------------------------------------------------------------- the panels' queries

WINDOW = 10  # seconds: the rate window ($__rate_interval)


def rate_by(scrapes, name, by, **match):
    """sum by (`by`) (rate(name[WINDOW])) at each scrape."""
    result = {}
    for i, (t, s) in enumerate(scrapes):
        j = max(0, next((k for k in range(i, -1, -1) if t - scrapes[k][0] >= WINDOW), 0))
        if j == i:
            continue
        t0, s0 = scrapes[j]
        groups = {}
        for (n, l), v in s.items():
            d = dict(l)
            if n != name or not match.items() <= d.items():
                continue
            before = s0.get((n, l), 0.0)
            delta = v - before if v >= before else v
            key = " ".join(d.get(b, "") for b in by)
            groups[key] = groups.get(key, 0.0) + delta / (t - t0)
        for k, v in groups.items():
            result.setdefault(k, []).append((t, v))
    return result


def increase_by(scrapes, name, label):
    """sum by (`label`) (increase(name[WINDOW])) at each scrape: rate_by times the window."""
    return {
        k: [(t, v * WINDOW) for t, v in points] for k, points in rate_by(scrapes, name, [label]).items()
    }


def gauge(scrapes, name):
    return [(t, sum(v for (n, _), v in s.items() if n == name)) for t, s in scrapes]


def quantile(scrapes, name, q):
    """histogram_quantile(q, sum by (le) (rate(name_bucket[WINDOW])))."""
    out = []
    for i, (t, s) in enumerate(scrapes):
        j = next((k for k in range(i, -1, -1) if t - scrapes[k][0] >= WINDOW), None)
        if j is None:
            continue
        s0 = scrapes[j][1]
        buckets = {}
        for (n, l), v in s.items():
            if n == name + "_bucket":
                le = dict(l)["le"]
                le = float("inf") if le == "+Inf" else float(le)
                buckets[le] = buckets.get(le, 0.0) + v - s0.get((n, l), 0.0)
        if not buckets:
            continue
        bounds = sorted(buckets)
        total = buckets[bounds[-1]]
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for b in bounds:
            if buckets[b] >= rank:
                if b == float("inf"):
                    value = lower
                else:
                    value = lower + (b - lower) * (rank - below) / max(buckets[b] - below, 1e-12)
                out.append((t, value))
                break
            lower, below = b, buckets[b]
    return out


def plot(scrapes, output, outage):
    fig, axes = plt.subplots(5, 3, figsize=(18, 19))
    fig.suptitle(
        "cmc-forwarder — panels of deploy/monitoring/dashboard.json, rendered with matplotlib "
        "from real /metrics scrapes (120 s of traffic, NATS stopped at 45-70 s)\nAPI key rotated by "
        "SIGHUP: second key at 15 s, senders switch at 30 s, a refused file at 90 s, old key removed at 100 s",
        fontsize=12,
    )
    panels = axes.flatten()

    def draw(ax, title, lines, unit=""):
        for label, points in lines.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.2)
        ax.axvspan(*outage, color="red", alpha=0.07)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, loc="upper left")

    draw(panels[0], "Webhook requests by status code", rate_by(scrapes, "cmc_forwarder_http_requests_total", ["code"]), "req/s")
    draw(panels[1], "Events by type and status", rate_by(scrapes, "cmc_forwarder_events_total", ["event_type", "status"]), "events/s")
    draw(
        panels[2],
        "Publish latency per batch",
        {f"p{int(q * 100)}": quantile(scrapes, "cmc_forwarder_publish_duration_seconds", q) for q in (0.5, 0.9, 0.99)},
        "s",
    )
    draw(
        panels[3],
        "Batch size (entries per request)",
        {f"p{int(q * 100)}": quantile(scrapes, "cmc_forwarder_batch_size", q) for q in (0.5, 0.99)},
        "entries",
    )
    draw(panels[4], "Duplicates", {"duplicates/s": rate_by(scrapes, "cmc_forwarder_duplicates_total", []).get("", [])}, "msg/s")
    draw(panels[5], "Spool depth (messages)", {"messages": gauge(scrapes, "cmc_forwarder_spool_messages")}, "messages")
    draw(panels[6], "Spool depth (bytes)", {"bytes": gauge(scrapes, "cmc_forwarder_spool_bytes")}, "bytes")
    draw(panels[7], "Spool age", {"since last empty": gauge(scrapes, "cmc_forwarder_spool_backlog_age_seconds")}, "s")
    draw(panels[8], "Quarantined messages", {"quarantined": gauge(scrapes, "cmc_forwarder_spool_quarantined_messages")})
    draw(panels[9], "Dead letters", rate_by(scrapes, "cmc_forwarder_invalid_entries_total", ["event_type"]), "entries/s")
    draw(
        panels[10],
        "NATS connection and readiness",
        {
            "connected": gauge(scrapes, "cmc_forwarder_nats_connected"),
            "ready": gauge(scrapes, "cmc_forwarder_ready"),
        },
    )
    draw(
        panels[11],
        "Configuration reloads",
        increase_by(scrapes, "cmc_forwarder_config_reloads_total", "result"),
        "reloads",
    )
    draw(
        panels[12],
        "Requests by API key",
        {f"key {k}": v for k, v in rate_by(scrapes, "cmc_forwarder_api_key_requests_total", ["key"]).items()},
        "req/s",
    )
    panels[13].axis("off")
    panels[14].axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    fig.savefig(output, dpi=80)


if __name__ == "__main__":
    main()
