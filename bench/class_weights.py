"""Class weights on an imbalanced set: does `train.class_weights=balanced` raise macro-F1 over `none`?

A seeded subset of the embedded training tweets with `positive` cut to 5% (110 positive, 2,090 negative or neutral
rows), scored on the full embedded test split (3,534 tweets, positive about 31%), best checkpoint by validation
macro-F1; one run per setting and training seed (`--train-seeds`), the same seeds for both settings.

    python bench/class_weights.py [--positive 110] [--others 2090] [--seed 0] [--train-seeds 42 43 44]

Prints JSON and a markdown table and writes both to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from results_io import write_results

from afinar import cli
from afinar.core.assets import dataset_files
from afinar.core.runs import machine
from afinar.data.sources import read_table

SETTINGS = ["--set", "train.metric_for_best_model=macro_f1", "--set", "data.max_length=64",
            "--set", "train.learning_rate=1e-4"]


def imbalanced_train(folder: Path, positive: int, others: int, seed: int) -> Path:
    """The first `positive` positive and `others` other rows of a seeded shuffle of the embedded train split."""
    frame = read_table(dataset_files("tweets")["train"])
    shuffled = frame.iloc[np.random.default_rng(seed).permutation(len(frame))]
    is_positive = shuffled["label_text"] == "positive"
    subset = pd.concat([shuffled[is_positive].head(positive), shuffled[~is_positive].head(others)])
    path = folder / "imbalanced_train.csv"
    subset[["text", "label_text"]].rename(columns={"label_text": "label"}).to_csv(path, index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positive", type=int, default=110)
    parser.add_argument("--others", type=int, default=2090)
    parser.add_argument("--seed", type=int, default=0, help="the subset's seed")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train = imbalanced_train(folder, args.positive, args.others, args.seed)
        test = folder / "test.csv"
        frame = read_table(dataset_files("tweets")["test"])
        frame[["text", "label_text"]].rename(columns={"label_text": "label"}).to_csv(test, index=False)
        for seed in args.train_seeds:
            for weights in ("none", "balanced"):
                started = time.perf_counter()
                name = f"weights-{weights}-{seed}"
                assert cli.main(["train", "--data", str(train), "--test", str(test), *SETTINGS,
                                 "--set", f"train.class_weights={weights}", "--set", f"train.seed={seed}",
                                 "--set", f"train.output_dir={folder}", "--set", f"train.run_name={name}"]) == 0
                scored = json.loads((folder / name / "metrics.json").read_text())["test"]
                results.append(_row(weights, seed, scored, time.perf_counter() - started))
    for weights in ("none", "balanced"):
        scores = [r["test_macro_f1"] for r in results if r["class_weights"] == weights]
        spread = np.std(scores, ddof=1) if len(scores) > 1 else 0.0
        print(f"{weights}: test macro-F1 {np.mean(scores):.4f} ± {spread:.4f} over {len(scores)} training seeds")
    record = {"machine": machine(), "positive": args.positive, "others": args.others, "seed": args.seed,
              "results": results}
    table = ["| class_weights | training seed | test macro-F1 | test accuracy | positive recall | positive F1 "
             "| seconds |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['class_weights']} | {r['seed']} | {r['test_macro_f1']:.4f} | {r['test_accuracy']:.4f} | "
              f"{r['positive_recall']:.3f} | {r['positive_f1']:.3f} | {r['seconds']} |" for r in results]
    write_results("class_weights", record, "\n".join(table))
    print("\n".join(table))


def _row(weights: str, seed: int, scored: dict, seconds: float) -> dict:
    return {"class_weights": weights, "seed": seed, "test_macro_f1": scored["macro_f1"],
            "test_accuracy": scored["accuracy"], "positive_recall": scored["per_class"]["positive"]["recall"],
            "positive_f1": scored["per_class"]["positive"]["f1"], "seconds": round(seconds, 1)}


if __name__ == "__main__":
    main()
