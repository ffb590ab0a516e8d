"""The reference for `task: token_classification`: a plain Hugging Face `Trainer` NER script on WNUT-17.

afinar's token classification is done when it does at least as well as "a plain Trainer token-classification script
on the same data and model"; this is that script, written the way the Hugging Face tutorial writes it
(https://huggingface.co/docs/transformers/tasks/token_classification): words tokenized with
`is_split_into_words=True`, the word's tag on its first sub-token and -100 on the rest and on special tokens,
`DataCollatorForTokenClassification`, `AutoModelForTokenClassification` with id2label/label2id, seqeval entity
scores, evaluation every epoch, the best epoch by dev entity F1 kept, then one evaluation on test. Nothing from afinar
but the path of its packaged all-MiniLM-L6-v2. Hyperparameters are afinar's defaults: learning rate 5e-5, batch 32
(eval 64), weight decay 0.01, linear schedule with 6% warmup, seed 42, fp32, 3 epochs or more so that a small
training set still gets 300 optimizer steps (WNUT-17's 3,394 sentences: 107 steps an epoch, so 3 epochs).

    python bench/token_classification_reference.py      # the full reference run: 3 epochs, 321 steps
    python bench/token_classification_reference.py --max-train-sentences 64 --max-steps 2 --max-eval-sentences 64

Entity scores are seqeval's micro averages in strict IOB2 mode (what afinar reports), plus the default
(conlleval-style) F1 the tutorial prints. The headline test row scores every word of the gold file: a word left
without a sub-token (3 in test) or cut by truncation at 128 tokens (30 in test; together 2 of the 1,079 gold
entities) counts as predicted O; the tutorial's own scoring, which skips those words, is recorded beside it.
samples/s is training sentences over the training wall time less dev evaluation (checkpoint saves included).
Prints JSON and a markdown table and writes both to bench/results/ (or to `--out` and the .md beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from results_io import write_results
from seqeval import metrics
from seqeval.scheme import IOB2
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

from afinar.core.assets import model_path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wnut17"
MIN_STEPS, EPOCHS, BATCH, SEED = 300, 3, 32, 42


def read_conll(path: Path) -> dict[str, list]:
    """token<TAB>tag lines, sentences separated by blank lines (train.conll's hold a single tab)."""
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
            continue
        token, tag = line.split("\t")
        current.append((token, tag))
    if current:
        sentences.append(current)
    return {"tokens": [[t for t, _ in s] for s in sentences], "tags": [[g for _, g in s] for s in sentences]}


def scores(true: list[list[str]], pred: list[list[str]]) -> dict:
    strict = {"mode": "strict", "scheme": IOB2}
    return {"precision": metrics.precision_score(true, pred, **strict),
            "recall": metrics.recall_score(true, pred, **strict),
            "f1": metrics.f1_score(true, pred, **strict), "f1_default": metrics.f1_score(true, pred)}


def machine() -> dict:
    name, flags = platform.processor() or platform.machine(), []
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = sorted(f for f in value.split() if "bf16" in f or "amx" in f or "vnni" in f or f == "avx512f")
                break
    info = {"processor": name, "flags": flags, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> dict:
    splits = {name: read_conll(args.data / f"{name}.conll") for name in ("train", "dev", "test")}
    types = sorted({tag[2:] for split in splits.values() for tags in split["tags"] for tag in tags if tag != "O"})
    label_list = ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    label2id = {label: i for i, label in enumerate(label_list)}
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))

    def tokenize_and_align_labels(examples):
        tokenized = tokenizer(examples["tokens"], is_split_into_words=True, truncation=True, max_length=128)
        labels = []
        for i, tags in enumerate(examples["tags"]):
            previous, row = None, []
            for word in tokenized.word_ids(batch_index=i):
                row.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            labels.append(row)
        tokenized["labels"] = labels
        return tokenized

    datasets = {}
    for name, limit in (("train", args.max_train_sentences), ("dev", args.max_eval_sentences),
                        ("test", args.max_eval_sentences)):
        dataset = Dataset.from_dict(splits[name])
        if limit and limit < len(dataset):
            dataset = dataset.shuffle(seed=SEED).select(range(limit))
        splits[name] = dataset[:]
        datasets[name] = dataset.map(tokenize_and_align_labels, batched=True, remove_columns=["tokens", "tags"])

    def compute_metrics(prediction):
        predicted, labels = np.argmax(prediction.predictions, axis=2), prediction.label_ids
        true = [[label_list[t] for p, t in zip(ps, ts) if t != -100] for ps, ts in zip(predicted, labels)]
        pred = [[label_list[p] for p, t in zip(ps, ts) if t != -100] for ps, ts in zip(predicted, labels)]
        return scores(true, pred)

    steps_per_epoch = math.ceil(len(datasets["train"]) / BATCH)
    epochs = args.epochs or max(EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))
    set_seed(SEED)  # the new classification head's initial weights
    model = AutoModelForTokenClassification.from_pretrained(
        model_path("minilm-l6"), num_labels=len(label_list), id2label=dict(enumerate(label_list)), label2id=label2id)
    with tempfile.TemporaryDirectory(prefix="afinar-ner-reference-") as out:
        training_args = TrainingArguments(
            output_dir=out, learning_rate=5e-5, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
            num_train_epochs=epochs, max_steps=args.max_steps, weight_decay=0.01, warmup_steps=0.06,
            lr_scheduler_type="linear", seed=SEED, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
            load_best_model_at_end=True, metric_for_best_model="f1", greater_is_better=True, logging_steps=50,
            report_to="none")
        trainer = Trainer(model=model, args=training_args, train_dataset=datasets["train"],
                          eval_dataset=datasets["dev"], processing_class=tokenizer,
                          data_collator=DataCollatorForTokenClassification(tokenizer), compute_metrics=compute_metrics)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        test = trainer.predict(datasets["test"])  # the one evaluation on test
    dev_history = [{"epoch": e["epoch"], "loss": e["eval_loss"], "f1": e["eval_f1"], "f1_default": e["eval_f1_default"],
                    "seconds": e["eval_runtime"]} for e in trainer.state.log_history if "eval_f1" in e]
    eval_seconds = sum(e["seconds"] for e in dev_history)
    # every gold word scored: the first sub-token's prediction, O where the word has no sub-token left
    true, pred = splits["test"]["tags"], []
    for row, tokens in zip(test.predictions.argmax(-1), splits["test"]["tokens"]):
        tags = ["O"] * len(tokens)
        word_ids = tokenizer(tokens, is_split_into_words=True, truncation=True, max_length=128).word_ids()
        for position, word in reversed(list(enumerate(word_ids))):  # reversed: the first sub-token writes last
            if word is not None:
                tags[word] = label_list[row[position]]
        pred.append(tags)
    report = metrics.classification_report(true, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    sentences_seen = len(datasets["train"]) * trainer.state.epoch
    return {
        "reference": "plain transformers Trainer, HF token-classification tutorial recipe",
        "model": "minilm-l6 (all-MiniLM-L6-v2)", "data": str(args.data),
        "sentences": {name: len(d) for name, d in datasets.items()}, "labels": label_list,
        "hyperparameters": {"learning_rate": 5e-5, "batch_size": BATCH, "eval_batch_size": 64, "epochs": epochs,
                            "max_steps": args.max_steps, "weight_decay": 0.01, "warmup_ratio": 0.06,
                            "lr_scheduler": "linear", "seed": SEED, "precision": "fp32", "max_length": 128},
        "test": {**scores(true, pred), "per_type_f1": {t: report[t]["f1-score"] for t in types if t in report},
                 "support": {t: int(report[t]["support"]) for t in types if t in report},
                 "tutorial_scoring": {k.removeprefix("test_"): v for k, v in test.metrics.items()
                                      if k.removeprefix("test_") in ("precision", "recall", "f1", "f1_default")}},
        "dev_history": dev_history, "best_dev_f1": trainer.state.best_metric,
        "best_step": trainer.state.best_global_step,
        "steps": trainer.state.global_step, "epochs_run": trainer.state.epoch,
        "train_seconds": train_seconds, "dev_eval_seconds": eval_seconds,
        "samples_per_s": sentences_seen / (train_seconds - eval_seconds),
        "test_seconds": test.metrics["test_runtime"], "machine": machine(),
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in ("torch", "transformers", "datasets", "tokenizers", "accelerate",
                                                "seqeval")}},
        "command": " ".join(sys.argv),
    }


def table(r: dict) -> str:
    m, t, s = r["machine"], r["test"], r["test"]["tutorial_scoring"]
    flags = ", ".join(m["flags"]) or "no avx512/bf16/VNNI/AMX flags"
    gpu = f"; GPU {m['gpu']}" if "gpu" in m else ""
    n = r["sentences"]
    return "\n".join([
        (f"Machine: {m['cpus']} CPUs ({m['processor']}; {flags}{gpu}), torch threads {m['torch_threads']}; "
         f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}"),
        "",
        (f"Plain `Trainer` on WNUT-17, minilm-l6, {n['train']:,} train / {n['dev']:,} dev / {n['test']:,} test "
         f"sentences: {r['steps']} steps, {r['epochs_run']:g} epoch(s), {r['train_seconds']:.0f} s training "
         f"({r['dev_eval_seconds']:.0f} s of it dev evaluation), {r['samples_per_s']:.1f} sentences/s; "
         f"best dev F1 {r['best_dev_f1']:.4f} (step {r['best_step']})"),
        "",
        "| test scoring | precision | recall | F1 (strict IOB2) | F1 (seqeval default) |",
        "|---|---|---|---|---|",
        f"| every word | {t['precision']:.4f} | {t['recall']:.4f} | {t['f1']:.4f} | {t['f1_default']:.4f} |",
        (f"| tutorial (labelled sub-tokens only) | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} "
         f"| {s['f1_default']:.4f} |"),
        "",
        "| entity type | F1 (strict) | support |",
        "|---|---|---|",
        *[f"| {k} | {v:.4f} | {t['support'][k]} |" for k, v in t["per_type_f1"].items()],
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train/dev/test.conll")
    parser.add_argument("--max-train-sentences", type=int, help="seeded random subset of train")
    parser.add_argument("--max-eval-sentences", type=int, help="seeded random subsets of dev and test (smoke tests)")
    parser.add_argument("--epochs", type=float, help=f"default: {EPOCHS}, more if that is under {MIN_STEPS} steps")
    parser.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides the epochs (smoke tests)")
    parser.add_argument("--out", type=Path, help="JSON path (the table goes beside it as .md); "
                        "default bench/results/token_classification_reference-<time>.json")
    args = parser.parse_args()
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        args.out.with_suffix(".md").write_text(table(result) + "\n", encoding="utf-8")
    else:
        write_results("token_classification_reference", result, table(result))
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
