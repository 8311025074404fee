#!/usr/bin/env python3
"""Agent-fleet workload generator for v4serve (or any OpenAI-compatible server).

Many agent sessions share one long system prompt and one set of tool definitions; each session's history
grows turn by turn (user message -> assistant answer appended -> next user message). That is the traffic
whose prefix reuse the KV cache and prefix-aware routing are for.

Every request streams (so time to first token is measured where the client sees it) and asks for usage,
whose `prompt_tokens_details.cached_tokens` says how much of the prompt the worker reused. Reported:
requests, errors, block hit rate (cached / prompt tokens), TTFT p50/p90/p99 and end-to-end latency.

    tools/fleet/agent_fleet.py --url http://127.0.0.1:8080 --sessions 16 --turns 6 --concurrency 4

`--compare_routing BINARY MODEL_DIR` starts, twice, a router in front of `--workers` colocated decode
workers (once with --routing_policy=least_loaded, once with prefix_aware), runs the same workload (same
seed) against each, and prints both side by side.

Standard library only (no venv needed).
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu build deploy test review merge "
         "search fetch parse plan retry cache shard route queue token block layer expert window").split()

TOOLS = [
    {"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": {
            arg: {"type": "string", "description": f"The {arg} to use for {name}."} for arg in args},
            "required": list(args)}}}
    for name, desc, args in [
        ("search_code", "Search the repository for a symbol or text.", ("query", "path")),
        ("read_file", "Read a file of the repository.", ("path", "range")),
        ("run_tests", "Run the test suite or a subset of it.", ("filter", "timeout")),
        ("open_issue", "Open an issue in the tracker.", ("title", "body", "labels")),
        ("deploy", "Deploy a build to an environment.", ("environment", "version")),
    ]
]


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_prompt(rng_seed, n_words):
    rng = random.Random(rng_seed)
    return "You are a coding agent of the fleet. Rules: " + words(rng, n_words)


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Client:
    def __init__(self, url, api_key, model, timeout):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.api_key, self.model, self.timeout = api_key, model, timeout

    def chat_stream(self, messages, tools, max_tokens):
        """Returns (ttft_s, total_s, text, usage) for one streamed chat completion."""
        body = {"messages": messages, "tools": tools, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start = time.monotonic()
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
            ttft, text, usage = None, [], None
            buf = b""
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data: "):
                            continue
                        data = line[6:]
                        if data == b"[DONE]":
                            continue
                        obj = json.loads(data)
                        if "error" in obj:
                            raise RuntimeError(f"stream error: {obj['error']}")
                        for ch in obj.get("choices", []):
                            delta = ch.get("delta", {})
                            piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                            if (piece or delta.get("tool_calls")) and ttft is None:
                                ttft = time.monotonic() - start
                            text.append(delta.get("content") or "")
                        if obj.get("usage"):
                            usage = obj["usage"]
            total = time.monotonic() - start
            return (ttft if ttft is not None else total), total, "".join(text), usage or {}
        finally:
            conn.close()


def run_workload(args, url):
    """Runs the fleet against `url`; returns the summary dict."""
    client = Client(url, args.api_key, args.model, args.timeout)
    sysmsg = {"role": "system", "content": system_prompt(args.seed, args.system_words)}
    rng = random.Random(args.seed)
    sessions = [[sysmsg] for _ in range(args.sessions)]
    lock = threading.Lock()
    records, errors = [], []

    def one_turn(i, turn):
        msgs = sessions[i]
        user = {"role": "user", "content": f"Session {i} turn {turn}: " + words(
            random.Random(args.seed * 7919 + i * 131 + turn), args.user_words)}
        convo = msgs + [user]
        try:
            ttft, total, text, usage = client.chat_stream(convo, TOOLS, args.max_tokens)
        except Exception as e:  # noqa: BLE001 - recorded and reported
            with lock:
                errors.append(str(e))
            return
        prompt = usage.get("prompt_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        with lock:
            records.append({"session": i, "turn": turn, "ttft": ttft, "total": total,
                            "prompt_tokens": prompt, "cached_tokens": cached})
            sessions[i] = convo + [{"role": "assistant", "content": text or "ok"}]

    # Turn by turn: every session's turn t runs (concurrently, in random order) before any turn t+1,
    # so histories grow together as an agent fleet's do.
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for turn in range(args.turns):
            order = list(range(args.sessions))
            rng.shuffle(order)
            list(pool.map(lambda i: one_turn(i, turn), order))
    wall = time.monotonic() - started
    ttfts = [r["ttft"] for r in records]
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    later = [r["ttft"] for r in records if r["turn"] > 0]
    return {
        "requests": len(records), "errors": len(errors), "first_error": errors[0] if errors else "",
        "wall_s": wall, "prompt_tokens": prompt, "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_p50_later_turns_s": percentile(later, 50),
        "latency_p50_s": percentile([r["total"] for r in records], 50),
    }


def print_table(rows):
    keys = ["requests", "errors", "prompt_tokens", "cached_tokens", "hit_rate", "ttft_p50_s", "ttft_p90_s",
            "ttft_p99_s", "ttft_p50_later_turns_s", "latency_p50_s", "wall_s"]
    names = list(rows)
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in keys:
        vals = []
        for n in names:
            v = rows[n][k]
            vals.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        print(f"| {k} | " + " | ".join(vals) + " |")


class Cluster:
    """A router with N colocated decode workers on loopback, started from the v4serve binary."""

    def __init__(self, binary, model_dir, workers, policy, extra_worker_flags, log_dir):
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="v4fleet-")
        addrs = []
        for w in range(workers):
            ready = os.path.join(self.tmp, f"decode{w}.json")
            self._start([binary, "decode", "--colocated", "--model=" + model_dir, "--host=127.0.0.1",
                         "--grpc_port=0", "--metrics_port=-1", "--ready_file=" + ready] + extra_worker_flags,
                        os.path.join(log_dir, f"{policy}-decode{w}.log"))
            addrs.append(f"127.0.0.1:{self._wait(ready)['grpc_port']}")
        ready = os.path.join(self.tmp, "router.json")
        self._start([binary, "router", "--model=" + model_dir, "--host=127.0.0.1", "--http_host=127.0.0.1",
                     "--http_port=0", "--grpc_port=0", "--metrics_port=-1", "--ready_file=" + ready,
                     "--decode_workers=" + ",".join(addrs), "--routing_policy=" + policy,
                     "--worker_health_interval=500ms"],
                    os.path.join(log_dir, f"{policy}-router.log"))
        self.url = f"http://127.0.0.1:{self._wait(ready)['http_port']}"
        self._await_ready()

    def _start(self, argv, log):
        self.procs.append(subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT))

    def _wait(self, path, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[1]} exited with {p.returncode} (see its log)")
            if os.path.exists(path):
                with open(path) as f:
                    try:
                        return json.load(f)
                    except json.JSONDecodeError:
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {path}")

    def _await_ready(self, timeout=60):
        u = urllib.parse.urlparse(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("router never became ready")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="router base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--compare_routing", nargs=2, metavar=("V4SERVE_BINARY", "MODEL_DIR"),
                    help="start least_loaded and prefix_aware clusters and compare them")
    ap.add_argument("--workers", type=int, default=2, help="decode workers per cluster (--compare_routing)")
    ap.add_argument("--worker_flags", default="", help="extra flags for each decode worker (space-separated)")
    ap.add_argument("--log_dir", default=None, help="where cluster logs go (--compare_routing)")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--system_words", type=int, default=300, help="shared system prompt length (words)")
    ap.add_argument("--user_words", type=int, default=30)
    ap.add_argument("--max_tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", ""))
    ap.add_argument("--model", default="")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON too")
    args = ap.parse_args()
    if bool(args.url) == bool(args.compare_routing):
        ap.error("give exactly one of --url or --compare_routing")
    rows = {}
    if args.url:
        rows["run"] = run_workload(args, args.url)
    else:
        binary, model_dir = args.compare_routing
        log_dir = args.log_dir or tempfile.mkdtemp(prefix="v4fleet-logs-")
        os.makedirs(log_dir, exist_ok=True)
        for policy in ("least_loaded", "prefix_aware"):
            cluster = Cluster(binary, model_dir, args.workers, policy, args.worker_flags.split(), log_dir)
            try:
                rows[policy] = run_workload(args, cluster.url)
            finally:
                cluster.stop()
        print(f"logs: {log_dir}", file=sys.stderr)
    print_table(rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 1 if any(r["errors"] for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
