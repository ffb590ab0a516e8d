"""Training speed, side by side in one run: the tutorial recipe, plain `Trainer`, a tuned `Trainer` (fp32, and bf16
autocast with `use_cpu=True`), afinar's default path (`precision: auto`) and afinar with LoRA, on real tweets, one
fresh process per configuration. afinar is compared with the faster of the two tuned `Trainer` rows.

    python bench/train_speed.py            # minilm-l6, a GPT-2-small-shaped model, smollm2-135m
    python bench/train_speed.py --quick    # fewer samples and models, under 5 minutes
    python bench/train_speed.py --repeats 3  # three interleaved rounds (seeds 42, 43, 44); medians reported

Prints JSON and a markdown table and writes both to bench/results/. MFU counts 6 x non-embedding parameters
per trained token (4 x where LoRA freezes the weights) plus attention (12 x layers x width x length per token),
against the matmul peak in the dtype the configuration computes in, measured in the row's own process just before
and after its training (a shared host's speed drifts by a third over an hour).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

from results_io import write_results

PATHS = ("tutorial", "trainer_default", "trainer_grouped", "trainer_grouped_bf16", "afinar", "afinar_lora")
TUNED = ("trainer_grouped", "trainer_grouped_bf16")
MODELS = ("minilm-l6", "gpt2-small", "smollm2-135m")


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of an n x n matmul, the machine's practical ceiling for dense layers."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def build_model(name: str, num_labels: int):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from afinar.core.config import ModelArgs
    from afinar.core.models import load_classifier, load_tokenizer

    torch.manual_seed(0)
    if name == "gpt2-small":  # GPT-2 small's shape (124M), random weights: no GPT-2 weights exist offline
        tokenizer = load_tokenizer(ModelArgs(name="gpt2-tokenizer"))
        model = GPT2ForSequenceClassification(GPT2Config(num_labels=num_labels, pad_token_id=tokenizer.pad_token_id))
        return tokenizer, model, 1024
    args = ModelArgs(name=name)
    tokenizer = load_tokenizer(args)
    model = load_classifier(args, [str(i) for i in range(num_labels)], tokenizer)
    return tokenizer, model, 512 if name == "minilm-l6" else 1024


def shape(model) -> dict:
    """Non-embedding parameters, layers and width: what the FLOP count needs."""
    config = model.config
    embeddings = {id(p) for m in model.modules() if m.__class__.__name__.endswith("Embedding") for p in m.parameters()}
    params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    return {"non_embedding_params": params, "layers": layers, "width": width}


def worker(spec: dict) -> dict:
    """One configuration in a fresh process: train `spec['samples']` tweets, measure, report."""
    started = time.perf_counter()
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from afinar.core.config import DataArgs, LoraArgs, TrainArgs
    from afinar.data.sources import load_splits, tokenize
    from afinar.training import precision
    from afinar.training.trainer import LengthBucketTrainer, apply_lora, speed_up, training_arguments, typical_length

    splits = load_splits(DataArgs(source="tweets", max_train_samples=spec["samples"], max_eval_samples=256), 42)
    tokenizer, model, model_max = build_model(spec["model"], len(splits.label_names))
    path = spec["path"]
    tutorial = path == "tutorial"
    prep = time.perf_counter()
    if tutorial:  # the tutorial: every text padded to the model's maximum, batch 1
        def pad_all(batch):
            return tokenizer(batch["text"], padding="max_length", truncation=True, max_length=model_max)
        train_ds = splits.train.map(pad_all, batched=True, remove_columns=["text"])
    else:
        train_ds = tokenize(splits.train, tokenizer, 64)
    eval_ds = tokenize(splits.validation, tokenizer, 64)
    prep = time.perf_counter() - prep
    geometry = shape(model)
    lora = path == "afinar_lora"
    if lora:
        model = apply_lora(model, LoraArgs(enabled=True), "SEQ_CLS")
    out = f"/tmp/afinar-bench-{os.getpid()}"
    common = {"output_dir": out, "report_to": "none", "save_strategy": "no", "seed": spec["seed"], "disable_tqdm": True,
              "num_train_epochs": 1, "logging_steps": 10_000, "learning_rate": 5e-5,
              "dataloader_pin_memory": False}
    reason = "set by the recipe"
    if path.startswith("afinar"):
        settings = TrainArgs(batch_size=spec["batch"], epochs=1, learning_rate=5e-5, seed=spec["seed"],
                             warmup_ratio=0.0, weight_decay=0.0, logging_steps=10_000)
        speed_up(model, settings)  # what build_trainer does: the CPU speed-ups, then precision auto
        choice = precision.choose(settings.precision, model, spec["batch"], typical_length(train_ds))
        args = training_arguments(settings, Path(out), choice.precision, has_eval=False)
        reason = choice.reason
        args.save_strategy = "no"
        args.disable_tqdm = True
    elif tutorial:
        args = TrainingArguments(per_device_train_batch_size=1, gradient_accumulation_steps=4, **common)
    else:
        bf16 = {"bf16": True, "use_cpu": not torch.cuda.is_available()} if path == "trainer_grouped_bf16" else {}
        args = TrainingArguments(per_device_train_batch_size=spec["batch"], **common, **bf16,
                                 train_sampling_strategy="group_by_length" if path in TUNED else "random")
    counts = {"real": 0, "padded": 0, "lengths_sq": 0}
    collate = DataCollatorWithPadding(tokenizer)

    def counting(features):
        batch = collate(features)
        mask = batch["attention_mask"]
        counts["real"] += int(mask.sum())
        counts["padded"] += mask.numel()
        counts["lengths_sq"] += int((mask.sum(dim=1) ** 2).sum())
        return batch

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first_step", time.perf_counter())

    trainer_class = LengthBucketTrainer if path.startswith("afinar") else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, data_collator=counting,
                            processing_class=tokenizer, callbacks=[Clock()])
    dtype = "bfloat16" if args.bf16 else "float32"
    measuring = time.perf_counter()
    peak_before = matmul_peak(dtype, seconds=2.0)  # the host's speed around this run, not only at the start
    measuring = time.perf_counter() - measuring
    begin = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - begin
    peak = (peak_before + matmul_peak(dtype, seconds=2.0)) / 2
    trainer.data_collator = collate
    eval_loss = trainer.evaluate(eval_ds)["eval_loss"]
    factor = 4 if lora else 6
    flops = factor * geometry["non_embedding_params"] * counts["real"] + \
        12 * geometry["layers"] * geometry["width"] * counts["lengths_sq"]
    return {"model": spec["model"], "path": path, "samples": len(train_ds), "batch": 1 if tutorial else spec["batch"],
            "dtype": dtype, "precision_reason": reason, "seconds": seconds, "samples_per_s": len(train_ds) / seconds,
            "real_tokens_per_s": counts["real"] / seconds, "padded_tokens_per_s": counts["padded"] / seconds,
            "tflop": flops / 1e12, "achieved_gflops": flops / seconds / 1e9, "matmul_peak_gflops": peak,
            "mfu": flops / seconds / 1e9 / peak,
            "seconds_to_first_step": marks["first_step"] - started - measuring, "data_prep_seconds": prep,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "eval_loss": float(eval_loss), "optimizer": args.optim,
            "torch_threads": torch.get_num_threads(), "padding_share": 1 - counts["real"] / max(counts["padded"], 1),
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad))}


def run_once(spec: dict) -> dict:
    """One configuration in a fresh process (no warm caches, allocator or threads shared with another row)."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    """The run with the median speed, carrying every run's samples/s and validation loss: a busy host moves single
    runs by 10-20%, and rounds interleave the configurations so that a slow spell hits all of them alike."""
    runs = sorted(runs, key=lambda r: r["samples_per_s"])
    return {**runs[len(runs) // 2], "samples_per_s_runs": [r["samples_per_s"] for r in runs],
            "eval_loss_runs": [r["eval_loss"] for r in runs]}


def loss_check(afinar: dict, tuned: dict) -> dict:
    """afinar's mean validation loss over the rounds (one seed each) against the tuned `Trainer`'s, beside the
    tuned `Trainer`'s own spread between seeds: the yardstick for whether a gap is a change in what is learned."""
    afinar_mean, tuned_mean = fmean(afinar["eval_loss_runs"]), fmean(tuned["eval_loss_runs"])
    spread = (max(tuned["eval_loss_runs"]) - min(tuned["eval_loss_runs"])) / tuned_mean
    gap = afinar_mean / tuned_mean - 1
    return {"afinar_mean": afinar_mean, "tuned_trainer_mean": tuned_mean, "relative_gap": gap,
            "within_2_percent": abs(gap) <= 0.02, "tuned_trainer_seed_spread": spread,
            "seeds": len(tuned["eval_loss_runs"])}


def run_all(models: list[str], samples: dict[str, int], batch: int, seed: int, repeats: int = 1) -> dict:
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    runs: dict[tuple[str, str], list[dict]] = {}
    errors = {}
    for round_ in range(repeats):
        for model in models:
            for path in PATHS:
                n = max(8, samples[model] // 40) if path == "tutorial" else samples[model]
                row = run_once({"model": model, "path": path, "samples": n, "batch": batch, "seed": seed + round_})
                if "error" in row:
                    errors[model, path] = row
                    continue
                runs.setdefault((model, path), []).append(row)
                print(f"round {round_ + 1}/{repeats} {model:<13} {path:<16} {row['samples_per_s']:8.2f} samples/s  "
                      f"MFU {row['mfu']:.0%}", file=sys.stderr)
    rows = [median_row(runs[model, path]) if (model, path) in runs else errors[model, path]
            for model in models for path in PATHS if (model, path) in runs or (model, path) in errors]
    for model in models:
        by_path = {r["path"]: r for r in rows if r["model"] == model and "error" not in r}
        tuned = [by_path[p] for p in TUNED if p in by_path]
        if "afinar" in by_path and "tutorial" in by_path and tuned:
            t = max(tuned, key=lambda r: r["samples_per_s"])  # the best a `Trainer` user could configure
            a, tut = by_path["afinar"], by_path["tutorial"]
            a["tuned_trainer_path"] = t["path"]
            a["speedup_vs_tuned_trainer"] = a["samples_per_s"] / t["samples_per_s"]
            a["speedup_vs_tutorial"] = a["samples_per_s"] / tut["samples_per_s"]
            a["loss_check"] = loss_check(a, t)
        if {"afinar", "afinar_lora"} <= by_path.keys():
            by_path["afinar_lora"]["speedup_vs_full"] = by_path["afinar_lora"]["samples_per_s"] / \
                by_path["afinar"]["samples_per_s"]
    import platform

    from afinar.training.precision import cpu_identity

    identity = cpu_identity()
    return {"machine": {"processor": identity["cpu"] or platform.processor() or platform.machine(),
                        "flags": identity["flags"], "cpus": os.cpu_count()},
            "matmul_peak_gflops": peaks, "repeats": repeats, "seed": seed, "rows": rows}


def table(result: dict) -> str:
    peaks = result["matmul_peak_gflops"]
    lines = [f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['processor']}; "
             f"{', '.join(result['machine'].get('flags', [])) or 'no bf16/VNNI/AMX flags'}); matmul peak at the "
             f"start fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s; each row's MFU is "
             "against the peak measured in its own process just before and after training (the peak column)", "",
             f"Each configuration ran {result['repeats']} time(s), rounds interleaved, round r with seed "
             f"{result['seed']} + r; the run of median speed is shown (its eval loss too) with the range of samples/s.",
             "",
             "| model | path | dtype | samples/s | range | real tok/s | padded tok/s | peak GFLOP/s | MFU "
             "| first step (s) | peak RSS (MB) | eval loss | vs tuned Trainer |", "|---" * 13 + "|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['path']} | error: {r['error']} |" + " |" * 10)
            continue
        versus = (f"{r['speedup_vs_tuned_trainer']:.2f}x ({r['tuned_trainer_path']})"
                  if "speedup_vs_tuned_trainer" in r else "")
        spread = r.get("samples_per_s_runs", [r["samples_per_s"]])
        lines.append(f"| {r['model']} | {r['path']} | {r['dtype']} | {r['samples_per_s']:.2f} | "
                     f"{min(spread):.2f}-{max(spread):.2f} | "
                     f"{r['real_tokens_per_s']:.0f} | {r['padded_tokens_per_s']:.0f} | "
                     f"{r['matmul_peak_gflops']:.0f} | {r['mfu']:.0%} | "
                     f"{r['seconds_to_first_step']:.1f} | {r['peak_rss_mb']:.0f} | {r['eval_loss']:.4f} | {versus} |")
    for r in result["rows"]:
        if "loss_check" in r:
            c = r["loss_check"]
            lines.append(f"\n{r['model']}: mean validation loss over {c['seeds']} seed(s), "
                         f"afinar {c['afinar_mean']:.4f} vs tuned Trainer ({r['tuned_trainer_path']}) "
                         f"{c['tuned_trainer_mean']:.4f}: "
                         f"{c['relative_gap']:+.1%} "
                         f"({'within' if c['within_2_percent'] else 'outside'} 2%; the tuned Trainer's own spread "
                         f"between seeds {c['tuned_trainer_seed_spread']:.1%})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, no smollm2: under 5 minutes")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42, help="training seed of the first round, round r trains with "
                        "seed + r (the data subset stays the same), so repeats also show the loss spread between seeds")
    parser.add_argument("--repeats", type=int, default=1, help="run every configuration this many times, in "
                        "interleaved rounds, and report the median (a busy host moves single runs by 10-20%%)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    models = args.models.split(",") if args.models else (["minilm-l6", "gpt2-small"] if args.quick else list(MODELS))
    samples = ({"minilm-l6": 640, "gpt2-small": 256, "smollm2-135m": 128} if args.quick else
               {"minilm-l6": 3200, "gpt2-small": 640, "smollm2-135m": 320})
    result = run_all(models, samples, args.batch, args.seed, args.repeats)
    write_results("train_speed", result, table(result))
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
