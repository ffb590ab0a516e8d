"""Inference speed, latency, memory and accuracy of one classification run on every backend.

    python bench/inference.py runs/<run> [--quick]

All rows score the same texts, the 3,534 embedded test tweets sorted by length, truncated at the run's
max length, in one invocation:
    tutorial    pad every tweet to 512 tokens, batch 1, PyTorch under `no_grad` (on a subsample: it is slow)
    torch       `load_predictor(backend="torch")`: eager PyTorch, `inference_mode`, dynamic padding
    torch-bf16  the same under bf16 autocast (fast where the CPU has native bf16, slow where it is emulated)
    onnx        ONNX Runtime fp32 (`afinar export`)
    onnx-int8   ONNX Runtime with dynamically quantized int8 weights (`afinar export --int8`)
    auto        what `--backend auto` picks from the export's check (the row names it)
each at batch 1 (one request per tweet: tweets/s and p50/p99 latency per request, tokenization included)
and batch 32 (throughput over the whole set, and the test accuracy). Each backend runs in its own
subprocess, so its peak RSS is its own. MFU (fp32 and bf16 rows) = 2 x non-embedding parameters x real
(unpadded) tokens / seconds, over the matmul peak in the row's dtype measured here first (attention's own FLOPs
are left out, so MFU is a slight underestimate; int8 has no comparable peak). A missing export is written into the
run folder first.
`--quick` (about 2 minutes on an idle 2-core machine) subsamples: 20 tutorial tweets, 150 at batch 1,
640 at batch 32.
Writes JSON and a markdown table to bench/results/ (gitignored) and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_results

BACKENDS = ("tutorial", "torch", "torch-bf16", "onnx", "onnx-int8", "auto")
PEAK_DTYPE = {"tutorial": "float32", "torch": "float32", "onnx": "float32", "torch-bf16": "bfloat16"}
SIZES = {"quick": {"tutorial": 20, "batch1": 150, "batch32": 640},
         "full": {"tutorial": 200, "batch1": None, "batch32": None}}


def spread(items: list, n: int | None) -> list:
    """`n` items evenly spaced over a length-sorted list, so a subsample keeps the length distribution."""
    if n is None or n >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def matmul_peak(dtype: str = "float32", seconds: float = 2.0, n: int = 2048) -> float:
    """Sustained GFLOP/s of torch matmul in `dtype` on this machine's cores, right now."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return best


def non_embedding_parameters(model_dir: Path) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    embedded = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - embedded


# ---------------------------------------------------------------- one backend, in its own process


def peak_rss_mib() -> float:
    """This process's peak resident memory. Not `getrusage`: Linux carries its maximum across exec, so a
    subprocess would report its parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tutorial(run_dir: Path):
    """The way most tutorials predict: pad to the model's maximum, one text at a time, `no_grad`."""
    import numpy as np
    import torch

    from afinar.inference.predictors import Predictor, load_predictor

    classifier = load_predictor(run_dir, "torch")
    length = min(512, classifier.model.config.max_position_embeddings)

    class Tutorial(Predictor):
        backend, tokenizer, labels, max_length = "tutorial", classifier.tokenizer, classifier.labels, length

        def logits(self, texts, batch_size=1):
            rows = []
            for text in texts:
                encoded = self.tokenizer(text, padding="max_length", truncation=True, max_length=length,
                                         return_tensors="pt")
                with torch.no_grad():
                    rows.append(classifier.model(**encoded).logits.numpy())
            return np.concatenate(rows)

    return Tutorial()


def worker(backend: str, run_dir: Path, texts_file: Path, quick: bool) -> dict:
    import numpy as np

    from afinar.data.sources import encode
    from afinar.inference.predictors import load_predictor

    sizes = SIZES["quick" if quick else "full"]
    data = json.loads(texts_file.read_text())
    texts, gold = data["texts"], np.array(data["labels"])
    started = time.perf_counter()
    predictor = _tutorial(run_dir) if backend == "tutorial" else load_predictor(run_dir, backend)
    load_seconds = time.perf_counter() - started
    index = {name: i for i, name in enumerate(predictor.labels)}
    gold = np.array([index[data["label_names"][y]] for y in gold])
    positions = list(range(len(texts)))
    predictor.scores(texts[:4], 1)  # warm-up: allocators, thread pools, lazy initialisation
    if backend != "tutorial":
        predictor.scores(texts[-64:], 32)

    def real_tokens(chosen: list[int]) -> int:
        return sum(map(len, encode(predictor.tokenizer, [texts[i] for i in chosen],
                                   predictor.max_length)["input_ids"]))

    rows = []
    chosen = spread(positions, sizes["tutorial" if backend == "tutorial" else "batch1"])
    latencies, predicted = [], []
    for i in chosen:
        begin = time.perf_counter()
        predicted.append(int(predictor.scores([texts[i]], 1)[0].argmax()))
        latencies.append(time.perf_counter() - begin)
    rows.append({"batch_size": 1, "texts": len(chosen), "seconds": sum(latencies), "real_tokens": real_tokens(chosen),
                 "p50_ms": 1000 * statistics.median(latencies),
                 "p99_ms": 1000 * float(np.percentile(latencies, 99)),
                 "accuracy": float((np.array(predicted) == gold[chosen]).mean())})
    if backend != "tutorial":
        chosen = spread(positions, sizes["batch32"])
        begin = time.perf_counter()
        scores = predictor.scores([texts[i] for i in chosen], 32)
        rows.append({"batch_size": 32, "texts": len(chosen), "seconds": time.perf_counter() - begin,
                     "real_tokens": real_tokens(chosen),
                     "accuracy": float((scores.argmax(axis=1) == gold[chosen]).mean())})
    peak_rss = peak_rss_mib()
    for row in rows:
        row.update(backend=backend if backend != "auto" else f"auto ({predictor.backend})",
                   tweets_per_second=row["texts"] / row["seconds"],
                   peak_rss_mib=round(peak_rss), load_seconds=round(load_seconds, 2))
    return {"rows": rows}


# ---------------------------------------------------------------- the whole comparison


def ensure_export(run_dir: Path) -> dict:
    from afinar.inference.export import export_run

    record = run_dir / "onnx" / "export.json"
    if record.is_file() and {"onnx-int8", "torch-bf16"} <= json.loads(record.read_text())["backends"].keys():
        return json.loads(record.read_text())
    print(f"exporting {run_dir} to ONNX (fp32 + int8, torch-bf16 checked) first ...", file=sys.stderr)
    return export_run(run_dir, int8=True)


def table(result: dict) -> str:
    lines = [f"Run `{result['run']}`, {result['texts']:,} test tweets sorted by length, max length "
             f"{result['max_length']}{' (--quick subsamples)' if result['quick'] else ''}; {result['cores']} cores "
             f"({result['processor']}), matmul peak fp32 {result['peak_gflops']['float32']:.0f} / bf16 "
             f"{result['peak_gflops']['bfloat16']:.0f} GFLOP/s, load average {result['load_before']:.1f} "
             f"before / {result['load_after']:.1f} after.", "",
             "| path | batch | tweets/s | p50 ms | p99 ms | peak RSS MiB | test accuracy (n) | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        latency = (f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f}" if "p50_ms" in row else "— | —")
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "—"
        lines.append(f"| {row['backend']} | {row['batch_size']} | {row['tweets_per_second']:.1f} | {latency} "
                     f"| {row['peak_rss_mib']} | {row['accuracy']:.4f} ({row['texts']}) | {mfu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished classification run folder")
    parser.add_argument("--quick", action="store_true", help="subsample to finish in about 2 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.run, args.texts, args.quick)))
        return 0

    from afinar.core.config import DataArgs
    from afinar.core.runs import Run
    from afinar.data.sources import load_splits
    from afinar.inference.predictors import available_cores

    run = Run.open(args.run)
    run.require_finished()
    export = ensure_export(run.path)
    test = load_splits(DataArgs(source="tweets")).test
    pairs = sorted(zip(test["text"], test["label"]), key=lambda pair: len(pair[0]))
    load_before = os.getloadavg()[0]
    peaks = {dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}
    parameters = non_embedding_parameters(run.model_dir)
    from afinar.training.precision import cpu_identity

    result = {"run": str(run.path), "quick": args.quick, "texts": len(pairs), "max_length": export["max_length"],
              "cores": available_cores(), "platform": platform.platform(), "peak_gflops": peaks,
              "processor": cpu_identity()["cpu"], "cpu_flags": cpu_identity()["flags"],
              "non_embedding_parameters": parameters, "load_before": load_before, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps({"texts": [t for t, _ in pairs], "labels": [y for _, y in pairs],
                                          "label_names": test.features["label"].names}))
        for backend in BACKENDS:
            print(f"measuring {backend} ...", file=sys.stderr)
            command = [sys.executable, __file__, str(run.path), "--worker", backend, "--texts", str(texts_file)]
            done = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{backend} worker failed:\n{done.stderr[-3000:]}")
            result["rows"] += json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    result["load_after"] = os.getloadavg()[0]
    for row in result["rows"]:
        if row["backend"] in PEAK_DTYPE:
            peak = peaks[PEAK_DTYPE[row["backend"]]]
            row["mfu"] = 2 * parameters * row["real_tokens"] / row["seconds"] / (peak * 1e9)
    markdown = table(result)
    stem = write_results("inference", result, markdown, args.out, "quick" if args.quick else "")
    print(json.dumps(result, indent=2))
    print(markdown)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
