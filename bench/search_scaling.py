"""A search shared on PostgreSQL: trials per hour with 1 and then 2 `afinar search` worker processes on one study
each, on this machine, and the check that a study's trials are the union of its workers'.

    python bench/search_scaling.py [--trials 4] [--train-rows 800]

A throwaway PostgreSQL server (Debian's `postgresql`; tests/conftest.py `throwaway_postgres`) holds the studies.
Each trial fine-tunes the packaged all-MiniLM-L6 on `--train-rows` tweets for one epoch (the quickstart's settings,
validation capped at 300 rows, test at 500). One worker runs with every core; two workers get half the cores each
(OMP_NUM_THREADS), so on one machine the point is correctness and equal per-core throughput: more trials per hour
come from more machines, each pointing `--storage` at the same server. Prints JSON and a markdown table, saved
under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import throwaway_postgres  # noqa: E402
from results_io import write_results  # noqa: E402

SPACE = {"train.learning_rate": {"type": "float", "low": 3e-5, "high": 3e-4, "log": True},
         "train.batch_size": {"type": "categorical", "choices": [16, 32]}}


def run_study(url: str, study: str, workers: int, trials: int, train_rows: int, folder: Path) -> dict:
    import optuna
    import yaml

    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    threads = max(1, (os.cpu_count() or 2) // workers)
    command = [sys.executable, "-m", "afinar", "search", "examples/quickstart.yaml", "--space", str(space),
               "--trials", str(trials), "--storage", url, "--study", study, "--name", study, "--pruner", "none",
               "--set", f"train.output_dir={folder}", "--set", f"data.max_train_samples={train_rows}",
               "--set", "data.max_eval_samples=300", "--set", "data.max_test_samples=500"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(workers)]
    outputs = [process.communicate()[0] for process in processes]
    seconds = time.perf_counter() - started
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(f"a worker failed:\n{output[-3000:]}")
    loaded = optuna.load_study(study_name=study, storage=url)
    complete = [t for t in loaded.trials if t.state.name == "COMPLETE"]
    by_worker: dict[str, int] = {}
    for t in complete:
        by_worker[t.user_attrs["worker"]] = by_worker.get(t.user_attrs["worker"], 0) + 1
    ids = {f"{socket.gethostname()}:{process.pid}" for process in processes}
    record = json.loads((folder / f"search-{study}" / "search.json").read_text())
    return {"workers": workers, "threads_per_worker": threads, "seconds": round(seconds, 1),
            "trials_complete": len(complete), "trials_per_hour": round(len(complete) / seconds * 3600, 1),
            "trials_by_worker": by_worker,
            "study_is_union_of_workers": {t.user_attrs.get("worker") for t in loaded.trials} == ids, "best_validation": record["best_validation"],
            "test_accuracy": (record["test"] or {}).get("accuracy"),
            "test_scored_by": sum("search folder:" in output for output in outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--train-rows", type=int, default=800)
    args = parser.parse_args()
    results = []
    with throwaway_postgres() as url, tempfile.TemporaryDirectory(prefix="afinar-search-") as scratch:
        for workers in (1, 2):
            result = run_study(url, f"w{workers}", workers, args.trials, args.train_rows, Path(scratch))
            print(result, flush=True)
            results.append(result)
    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "trials": args.trials, "train_rows": args.train_rows, "results": results}
    lines = ["| workers | threads each | trials | seconds | trials/hour | trials by worker | test scored by |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['workers']} | {r['threads_per_worker']} | {r['trials_complete']} | {r['seconds']} | "
                     f"{r['trials_per_hour']} | {', '.join(map(str, r['trials_by_worker'].values()))} | "
                     f"{r['test_scored_by']} worker |")
    markdown = "\n".join(lines)
    print(json.dumps(record, indent=2))
    print(markdown)
    print(f"saved {write_results('search_scaling', record, markdown)}.json / .md")


if __name__ == "__main__":
    main()
