"""Loopback load test of afinar's HTTP server: throughput and latency under concurrent single-text requests.

    python bench/serve_load.py runs/<run> --requests 2000 --concurrency 64 --idle-sockets 200 [--backend ...]

The server runs in a subprocess (as in production, and so the client does not share its interpreter) on a free
127.0.0.1 port with a random bearer token. Each request carries one tweet sampled from the embedded tweets test
split; concurrent requests are what the server's micro-batching turns into shared forward passes. Meanwhile
`--idle-sockets` connections send half a request line and never the rest (slowloris), reconnecting whenever the
server cuts them off, and `/health` is polled every 0.2 s: the real clients must see no error, /health must
answer throughout, and the server's peak RSS is reported. A handful of malformed, oversized or unauthenticated
requests must each get a 4xx JSON error. With several backends, each gets its own server and the same requests,
one after the other. Prints a JSON result, then a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

SERVER = ("import sys; from afinar.serving.app import serve; "
          "serve(sys.argv[1], port=int(sys.argv[2]), backend=sys.argv[3], log_level='warning')")
BACKENDS = ("torch", "onnx", "onnx-int8", "auto")


def free_port() -> int:
    """A port the kernel just handed out; free again by the time the server binds it, barring a rare race."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tweets() -> list[str]:
    from afinar.core.config import DataArgs
    from afinar.data.sources import load_splits

    return list(load_splits(DataArgs(source="tweets")).test["text"])


async def wait_ready(client: httpx.AsyncClient, server: subprocess.Popen, timeout: float) -> None:
    """Poll /health while the server loads its model; give up if it exits or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


async def load(client: httpx.AsyncClient, texts: list[str], requests: int, concurrency: int,
               seed: int) -> dict:
    """`requests` one-text predictions from `concurrency` clients that each send their next as soon as one returns."""
    rng = random.Random(seed)
    bodies = [{"texts": [rng.choice(texts)]} for _ in range(requests)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    next_index = iter(range(requests))

    async def worker() -> None:
        for i in next_index:  # one shared iterator: each request is sent exactly once
            started = time.perf_counter()
            try:
                response = await client.post("/predict", json=bodies[i])
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    ms = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": requests, "concurrency": concurrency, "seconds": round(seconds, 3),
            "errors": sum(errors.values()), "error_types": errors,
            "non_2xx": sum(n for status, n in statuses.items() if not 200 <= status < 300),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "throughput_rps": round(requests / seconds, 1),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
                           "mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2)}}


async def half_open(port: int, count: int, stop: asyncio.Event) -> dict:
    """`count` connections that each send half a request line and wait; whenever the server closes one, it opens
    again, until `stop`. Returns how many were opened and how many the server cut off."""
    counts = {"opened": 0, "cut_off_by_server": 0}

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            counts["opened"] += 1
            writer.write(b"POST /predict HTTP/1.1\r\nHost: bench\r\n")
            closed = asyncio.ensure_future(reader.read(1))
            await asyncio.wait([closed, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if closed.done():
                counts["cut_off_by_server"] += 1
            else:
                closed.cancel()
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return counts


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event) -> dict:
    """GET /health every 0.2 s until `stop`: how many answered 200 within 2 s, and the slowest answer."""
    answered, failed, slowest = 0, 0, 0.0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            ok = (await client.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            ok = False
        answered, failed = answered + ok, failed + (not ok)
        slowest = max(slowest, time.perf_counter() - started)
        await asyncio.sleep(0.2)
    return {"answered": answered, "failed": failed, "slowest_ms": round(slowest * 1000, 1)}


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM), Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


async def bad_requests(client: httpx.AsyncClient, limits: dict) -> dict[str, dict]:
    """Each malformed or oversized request, the status it got, and whether it got a 4xx with a JSON detail."""
    raw = {"content-type": "application/json"}
    cases = {
        "malformed_json": {"content": b'{"texts": ["unclosed', "headers": raw},
        "missing_field": {"json": {}},
        "wrong_type": {"json": {"texts": [1, 2]}},
        "empty_list": {"json": {"texts": []}},
        "too_many_texts": {"json": {"texts": ["ok"] * (limits["max_texts"] + 1)}},
        "text_too_long": {"json": {"texts": ["x" * (limits["max_text_chars"] + 1)]}},
        "body_too_large": {"content": b"x" * (limits["max_body_bytes"] + 1), "headers": raw},
        "not_utf8": {"content": b"\xff\xfe", "headers": raw},
        "no_token": {"json": {"texts": ["ok"]}, "headers": {"Authorization": ""}},
        "no_token_large_body": {"content": b"x" * (limits["max_body_bytes"] + 1),
                                "headers": {**raw, "Authorization": ""}},
    }
    results = {}
    for name, kwargs in cases.items():
        response = await client.post("/predict", **kwargs)
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        results[name] = {"status": response.status_code,
                         "ok": 400 <= response.status_code < 500 and isinstance(detail, str)}
    return results


def table(result: dict) -> str:
    timed, bad = result["load"], result["bad_requests"]
    answers = ", ".join(f"{name} {case['status']}" for name, case in bad.items())
    rows = [("backend", result["backend"]), ("requests", f"{timed['requests']:,}"),
            ("concurrency", timed["concurrency"]),
            ("throughput (req/s)", timed["throughput_rps"]), ("latency p50 (ms)", timed["latency_ms"]["p50"]),
            ("latency p99 (ms)", timed["latency_ms"]["p99"]), ("transport errors", timed["errors"]),
            ("non-2xx responses", timed["non_2xx"]),
            ("half-open sockets held / opened / cut off by the server",
             f"{result['idle_sockets']} / {result['half_open']['opened']:,} / "
             f"{result['half_open']['cut_off_by_server']:,}"),
            ("/health during the load: answered / failed / slowest (ms)",
             f"{result['health']['answered']} / {result['health']['failed']} / {result['health']['slowest_ms']}"),
            ("server peak RSS (MB)", result["server_peak_rss_mb"]),
            ("bad requests answered 4xx JSON", f"{sum(c['ok'] for c in bad.values())}/{len(bad)} ({answers})")]
    return "\n".join([f"| {result['run']} | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


async def bench(run_dir: Path, backend: str, requests: int, concurrency: int, seed: int,
                ready_timeout: float, idle_sockets: int) -> dict:
    texts = tweets()
    port, token = free_port(), secrets.token_urlsafe(24)
    env = {**os.environ, "AFINAR_SERVE_TOKEN": token}  # in the environment, not argv: `ps` does not show it
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(run_dir), str(port), backend], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                         headers={"Authorization": f"Bearer {token}"},
                                         limits=httpx.Limits(max_connections=concurrency)) as client:
                await wait_ready(client, server, ready_timeout)
                info = (await client.get("/info")).json()
                await load(client, texts, min(concurrency, requests), concurrency, seed + 1)  # warm-up, not counted
                stop = asyncio.Event()
                idle = asyncio.ensure_future(half_open(port, idle_sockets, stop))
                health = asyncio.ensure_future(poll_health(client, stop))
                timed = await load(client, texts, requests, concurrency, seed)
                stop.set()
                result = {"run": info["run"], "model": info["model"], "backend": info.get("backend", backend),
                          "limits": info["limits"], "client_cpus": os.cpu_count(), "load": timed,
                          "idle_sockets": idle_sockets, "half_open": await idle, "health": await health,
                          "bad_requests": await bad_requests(client, info["limits"]),
                          "server_peak_rss_mb": peak_rss_mb(server.pid)}
        except BaseException:
            log.seek(0)
            print(log.read()[-4000:], file=sys.stderr)
            raise
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (runs/<run>)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests (default 2,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--idle-sockets", type=int, default=200,
                        help="half-open connections held during the load (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="which tweets are sampled")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds allowed for the model to load")
    parser.add_argument("--backend", default="auto",
                        help=f"comma-separated, each served and loaded in turn: {', '.join(BACKENDS)} (default auto)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backend takes {', '.join(BACKENDS)}")
    results = [asyncio.run(bench(args.run_dir, backend, args.requests, args.concurrency, args.seed,
                                 args.ready_timeout, args.idle_sockets)) for backend in backends]
    print(json.dumps(results, indent=2))
    print()
    print("\n\n".join(table(result) for result in results))
    failed = any(result["load"]["errors"] or result["load"]["non_2xx"] or result["health"]["failed"] or not all(
        case["ok"] for case in result["bad_requests"].values()) for result in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
