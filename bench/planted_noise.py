"""Planted label noise: how many wrongly labelled rows do afinar's two suspect rankings put near the top?

5% of 2,000 real training tweets get a wrong label at random (a seeded flip to one of the other two classes); 500
other tweets are a clean validation split. Then, with the packaged MiniLM:
- `check`: `afinar check --suspects` (frozen-encoder features, out-of-fold logistic regression);
- `trained`: `afinar train examples/tweets.yaml` on the noisy rows, whose run ranks its training rows by the
  fine-tuned model's probability of their label (`suspects.csv`).
For each, the flipped rows among the top 200 suspects (chance: 10 of 100).

    python bench/planted_noise.py [--flip-seeds 0 1 2] [--methods check trained]

Prints JSON and a markdown table and writes both to bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import write_results

from afinar import cli
from afinar.core.runs import machine

ROOT = Path(__file__).resolve().parents[1]
TWEETS = ROOT.parent / "shared" / "data" / "tweet_sentiment_extraction" / "mteb_format_train.jsonl"
ROWS, FLIPPED, TOP = 2000, 100, 200


def noisy_files(folder: Path, seed: int) -> tuple[Path, Path, set[int]]:
    """The first 2,000 training tweets with 100 labels flipped (the train file), the next 500 clean (validation)."""
    with TWEETS.open(encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(ROWS + 500)]
    train, validation = rows[:ROWS], rows[ROWS:]
    rng = np.random.default_rng(seed)
    flipped = set(rng.choice(ROWS, FLIPPED, replace=False).tolist())
    for i in flipped:
        train[i] = {**train[i], "label": int((train[i]["label"] + rng.integers(1, 3)) % 3)}
    names = ["negative", "neutral", "positive"]  # the label ids of the hub-format file
    paths = folder / "noisy.jsonl", folder / "validation.jsonl"
    for path, part in zip(paths, (train, validation)):
        path.write_text("".join(json.dumps({"text": r["text"], "label": names[r["label"]]}) + "\n" for r in part),
                        encoding="utf-8")
    return *paths, flipped


def found(suspects_csv: Path, flipped: set[int]) -> int:
    with suspects_csv.open(encoding="utf-8") as handle:
        top = [int(r["row"]) for _, r in zip(range(TOP), csv.DictReader(handle)) if r["row"]]
    return len(flipped & set(top))


def run(method: str, folder: Path, train: Path, validation: Path) -> Path:
    """The suspects CSV `method` wrote for the noisy file."""
    data = ["--set", f"data.source={train}", "--set", f"data.validation={validation}"]
    if method == "check":
        out = folder / "check-suspects.csv"
        assert cli.main(["check", "examples/tweets.yaml", *data, "--suspects", str(out)]) == 0
        return out
    assert cli.main(["train", "examples/tweets.yaml", *data, "--set", f"train.output_dir={folder}",
                     "--set", "train.run_name=trained"]) == 0
    return folder / "trained" / "suspects.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flip-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["check", "trained"], choices=["check", "trained"])
    args = parser.parse_args()
    results = []
    for seed in args.flip_seeds:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                train, validation, flipped = noisy_files(folder, seed)
                started = time.perf_counter()
                suspects = run(method, folder, train, validation)
                results.append({"flip_seed": seed, "method": method, "flipped_in_top_200": found(suspects, flipped),
                                "seconds": round(time.perf_counter() - started, 1)})
                print(json.dumps(results[-1]), flush=True)
    record = {"machine": machine(), "rows": ROWS, "flipped": FLIPPED, "top": TOP, "results": results}
    table = ["| flip seed | method | flipped rows in the top 200 (of 100; chance 10) | seconds |", "|---|---|---|---|"]
    table += [f"| {r['flip_seed']} | {r['method']} | {r['flipped_in_top_200']} | {r['seconds']} |" for r in results]
    write_results("planted_noise", record, "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
