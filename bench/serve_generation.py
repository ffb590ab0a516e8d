"""Generation serving under load: tokens/s and latency at 1, 4 and 16 concurrent clients, one request at a time
(`--max-batch 1`, how the server decoded before continuous batching) against continuous batching (`--max-batch
16`), in one run on one machine; then a 4,096-token request beside 16 short ones, and how fast a client that
disconnects frees its row.

    python bench/serve_generation.py runs/<an sft or causal_lm run> [--rounds 2] [--max-tokens 64]

Each server is `afinar serve` in a subprocess (as in production) on a free loopback port with a random bearer
token. Clients are closed-loop: each sends its next chat request when the last returns, `--rounds` each; prompts
are real Self-Instruct seed instructions; every request decodes exactly `--max-tokens` tokens (`ignore_eos`, so
both servers do the same work whatever the samples say), temperature 0.7 with a per-request seed. tokens/s is all
completion tokens over the wall time of the level. For reference, the library's own `model.generate` decodes one
request in this process. Prints a JSON result, then a markdown table; both are saved under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402
from serve_load import free_port, wait_ready  # noqa: E402

SEED_TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct_seed" / "seed_tasks.jsonl"


def prompts() -> list[str]:
    rows = [json.loads(line) for line in SEED_TASKS.read_text(encoding="utf-8").splitlines()]
    out = []
    for row in rows:
        instance = row["instances"][0]
        out.append(row["instruction"] + (f"\n\n{instance['input']}" if instance.get("input") else ""))
    return out


def start_server(run: str, port: int, token_file: str, max_batch: int, timeout_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "afinar", "serve", run, "--port", str(port), "--token-file",
                             token_file, "--max-batch", str(max_batch), "--timeout", str(timeout_s),
                             "--max-queue", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def chat(model: str, prompt: str, max_tokens: int, seed: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "ignore_eos": True, "stream": stream}


def summary(latencies: list[float], tokens: int, seconds: float, errors: int) -> dict:
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": errors, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "latency_ms": {
                "p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
                "max": round(float(ms.max()), 1)}}


async def closed_loop(client: httpx.AsyncClient, model: str, texts: list[str], clients: int, rounds: int,
                      max_tokens: int, first_seed: int = 0) -> dict:
    latencies: list[float] = []
    tokens = errors = 0

    async def one(c: int) -> None:
        nonlocal tokens, errors
        for r in range(rounds):
            i = first_seed + c * rounds + r
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=chat(model, texts[i % len(texts)], max_tokens, i))
            if response.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(clients)))
    return summary(latencies, tokens, time.perf_counter() - started, errors)


async def long_beside_short(client: httpx.AsyncClient, model: str, texts: list[str], long_tokens: int,
                            short_clients: int, rounds: int, max_tokens: int) -> dict:
    """A streamed `long_tokens` request; once it is decoding, `short_clients` closed-loop clients of short ones."""
    decoded = {"tokens": 0, "seconds": 0.0, "finish_reason": None, "error": None}
    started_event = asyncio.Event()

    async def long_request() -> None:
        started = time.perf_counter()
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat(model, texts[0], long_tokens, 7, stream=True)) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    decoded["error"] = event["error"]["message"]
                    continue
                choice = event["choices"][0]
                decoded["tokens"] += 1 if choice["delta"].get("content") else 0
                decoded["finish_reason"] = choice["finish_reason"] or decoded["finish_reason"]
                started_event.set()
        decoded["seconds"] = round(time.perf_counter() - started, 1)

    task = asyncio.create_task(long_request())
    await started_event.wait()
    short = await closed_loop(client, model, texts, short_clients, rounds, max_tokens, first_seed=1000)
    health = (await client.get("/health")).json()
    short["long_request_still_decoding"] = not task.done()
    short["health_during"] = health
    await task
    return {"short": short, "long": decoded}


async def disconnect(client: httpx.AsyncClient, model: str, texts: list[str]) -> dict:
    """Stream a 1,024-token request, leave after a few pieces, and time until /health shows no row decoding."""
    async with client.stream("POST", "/v1/chat/completions",
                             json=chat(model, texts[1], 1024, 3, stream=True)) as response:
        pieces = 0
        async for line in response.aiter_lines():
            pieces += line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line
            if pieces >= 3:
                break
        during = (await client.get("/health")).json()
    left = time.perf_counter()
    while (await client.get("/health")).json().get("decoding"):
        await asyncio.sleep(0.01)
    return {"decoding_before_leaving": during.get("decoding"), "freed_after_s": round(time.perf_counter() - left, 3)}


def library_generate(run: str, texts: list[str], max_tokens: int) -> dict:
    """One request of `max_tokens` tokens in this process, by the library's `model.generate` and by afinar's
    decoder alone: the decoder's single-request speed against the library's."""
    import torch

    from afinar.core.runs import Run
    from afinar.inference.decoding import decode
    from afinar.inference.generation import Generator, Sampling
    from afinar.tasks import registry

    finished = Run.open(run)
    generator = Generator.for_run(finished, registry.for_run(finished).chat_prompts)
    prompt = generator.format.chat_ids(generator.tokenizer, [{"role": "user", "content": texts[0]}])
    ids = torch.tensor([prompt])

    def library() -> None:
        with torch.inference_mode():
            generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, do_sample=True, temperature=0.7, top_p=0.95)

    def afinar() -> None:
        [seq] = decode(generator.batch(1), [generator.sequence(prompt, Sampling(max_tokens, 0.7, 0.95, 0,
                                                                                ignore_eos=True))])
        assert seq.completion_tokens == max_tokens

    timings = {}
    for name, work in (("model_generate", library), ("afinar_decoder", afinar)):
        work()  # warm up
        started = time.perf_counter()
        work()
        timings[f"{name}_tokens_per_s"] = round(max_tokens / (time.perf_counter() - started), 1)
    return timings


async def serve_and_measure(args, texts: list[str], max_batch: int, timeout_s: float, extra: bool) -> dict:
    token = secrets.token_urlsafe(16)
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as handle:
        handle.write(token)
    port = free_port()
    server = start_server(args.run, port, handle.name, max_batch, timeout_s)
    out: dict = {"max_batch": max_batch, "timeout_s": timeout_s, "levels": {}}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None,
                                     headers={"Authorization": f"Bearer {token}"},
                                     limits=httpx.Limits(max_connections=64)) as client:
            await wait_ready(client, server, 300)
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            await closed_loop(client, model, texts, 1, 1, 8)  # warm up
            for clients in args.clients:
                out["levels"][str(clients)] = await closed_loop(client, model, texts, clients, args.rounds,
                                                                args.max_tokens)
                print(f"max_batch {max_batch}, {clients} clients: {out['levels'][str(clients)]}", flush=True)
            if extra:
                out["long_beside_short"] = await long_beside_short(client, model, texts, args.long_tokens, 16,
                                                                   args.rounds, args.max_tokens)
                print(f"long beside short: {out['long_beside_short']}", flush=True)
                out["disconnect"] = await disconnect(client, model, texts)
                print(f"disconnect: {out['disconnect']}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
        os.unlink(handle.name)
    return out


def table(record: dict) -> str:
    lines = ["| server | clients | tokens/s | p50 latency (s) | p99 latency (s) | errors |", "|---|---|---|---|---|---|"]
    for name, result in record["servers"].items():
        for clients, level in result["levels"].items():
            lines.append(f"| {name} | {clients} | {level['tokens_per_s']} | {level['latency_ms']['p50'] / 1000:.2f} | "
                         f"{level['latency_ms']['p99'] / 1000:.2f} | {level['errors']} |")
    both = record["servers"]["continuous batching"]
    if "long_beside_short" in both:
        short, long = both["long_beside_short"]["short"], both["long_beside_short"]["long"]
        lines += ["", f"A {record['long_tokens']:,}-token request beside 16 short-request clients: short p50 "
                      f"{short['latency_ms']['p50'] / 1000:.2f} s, p99 {short['latency_ms']['p99'] / 1000:.2f} s "
                      f"(default deadline 120 s), {short['tokens_per_s']} tokens/s; the long one "
                      f"{long['tokens']:,} pieces in {long['seconds']} s ({long['finish_reason'] or long['error']})."]
    if "disconnect" in both:
        lines.append(f"A client that left mid-stream: its row was free after {both['disconnect']['freed_after_s']} s.")
    reference = record["reference"]
    lines.append(f"One request in-process: the library's model.generate {reference['model_generate_tokens_per_s']} "
                 f"tokens/s, afinar's decoder {reference['afinar_decoder_tokens_per_s']} tokens/s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished sft or causal_lm run folder")
    parser.add_argument("--clients", type=lambda text: [int(x) for x in text.split(",")], default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=4096)
    parser.add_argument("--long-timeout", type=float, default=1200.0,
                        help="the batching server's deadline, so the long request can finish")
    args = parser.parse_args()
    texts = prompts()
    import torch

    record = {"run": args.run, "machine": {"cpu": platform.processor() or platform.machine(),
                                           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "max_tokens": args.max_tokens, "rounds": args.rounds, "long_tokens": args.long_tokens,
              "reference": library_generate(args.run, texts, args.max_tokens), "servers": {}}
    print(f"reference: {record['reference']}", flush=True)
    record["servers"]["one at a time"] = asyncio.run(serve_and_measure(args, texts, 1, 120.0, extra=False))
    record["servers"]["continuous batching"] = asyncio.run(serve_and_measure(args, texts, 16, args.long_timeout,
                                                                             extra=True))
    markdown = table(record)
    print(json.dumps(record, indent=2))
    print(markdown)
    print(f"saved {write_results('serve_generation', record, markdown)}.json / .md")


if __name__ == "__main__":
    main()
