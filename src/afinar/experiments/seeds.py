"""Several seeds: the same run repeated with `train.seed`, `train.seed + 1`, ...; the spread across seeds says
how much of a difference between two configurations the seed alone could make."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.runs import write_json
from afinar.evaluation.metrics import paired_rows

SCORES = ("accuracy", "macro_f1", "micro_f1", "loss", "perplexity")


@dataclass
class SeedsResult:
    path: Path  # seeds.json
    seeds: list[int]
    runs: list[str]
    per_seed: dict[str, dict[str, list[float]]]  # split -> metric -> one value per seed
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]  # sample standard deviation (ddof=1)


def summarise(seeds: list[int], runs: list[str], metrics: list[dict], path: Path) -> SeedsResult:
    per_seed: dict[str, dict[str, list[float]]] = {}
    for split in ("validation", "test"):
        for key in SCORES:
            values = [(m.get(split) or {}).get(key) for m in metrics]
            if all(isinstance(v, (int, float)) for v in values):
                per_seed.setdefault(split, {})[key] = [float(v) for v in values]
    mean = {s: {k: float(np.mean(v)) for k, v in scores.items()} for s, scores in per_seed.items()}
    std = {s: {k: float(np.std(v, ddof=1)) for k, v in scores.items()} for s, scores in per_seed.items()}
    return SeedsResult(path, seeds, runs, per_seed, mean, std)


def train_seeds(config: Config, count: int) -> SeedsResult:
    """`afinar.train` once per seed (runs named `<name>-seed<K>`), then mean and standard deviation, written to
    `<output_dir>/<name>-seeds.json`."""
    from afinar.tasks.registry import train

    if count < 2:
        raise AfinarError(f"--seeds needs at least 2 seeds to measure a spread (got {count})")
    name = config.train.run_name or f"{Path(config.data.source).stem or 'run'}"
    seeds = [config.train.seed + k for k in range(count)]
    runs, metrics = [], []
    for seed in seeds:
        run_config = copy.deepcopy(config)
        run_config.train.seed, run_config.train.run_name = seed, f"{name}-seed{seed}"
        result = train(run_config)
        runs.append(str(result.run_dir))
        metrics.append(result.metrics)
    path = Path(config.train.output_dir).expanduser().resolve() / f"{name}-seeds.json"
    summary = summarise(seeds, runs, metrics, path)
    write_json(path, {k: v for k, v in dataclasses.asdict(summary).items() if k != "path"})
    return summary


def format_seeds(result: SeedsResult) -> str:
    lines = [f"{len(result.seeds)} seeds ({', '.join(map(str, result.seeds))}):"]
    for split, scores in result.per_seed.items():
        for key, values in scores.items():
            lines.append(f"  {split} {key}: {result.mean[split][key]:.4f} ± {result.std[split][key]:.4f} "
                         f"(each seed: {', '.join(f'{v:.4f}' for v in values)})")
    lines.append(f"summary: {result.path}")
    return "\n".join(lines)


def compare_seeds(config: Config, strategies: str | list[str], out_dir: str | Path | None, count: int) -> Path:
    """`afinar compare` once per seed (into `<out>/seed-<K>`), then each strategy's mean ± standard deviation of
    validation and test accuracy over the seeds, written to `<out>/seeds.md` and `seeds.json`."""
    from afinar.experiments.compare import compare, experiment_folder

    if count < 2:
        raise AfinarError(f"--seeds needs at least 2 seeds to measure a spread (got {count})")
    out = experiment_folder(config, out_dir, "compare")
    scores: dict[str, dict[str, list[float]]] = {}
    gaps: dict[str, list[float]] = {}  # per strategy: test accuracy minus the first seed's best, per seed
    seeds = [config.train.seed + k for k in range(count)]
    comparisons = []
    for seed in seeds:
        seeded = copy.deepcopy(config)
        seeded.train.seed = seed
        comparisons.append(compare(seeded, strategies, out / f"seed-{seed}").results)
    for results in comparisons:
        for result in results:
            for split in ("validation", "test"):
                value = (getattr(result, split) or {}).get("accuracy")
                if value is not None and result.error is None:
                    scores.setdefault(result.name, {}).setdefault(split, []).append(float(value))
    best = max(scores, key=lambda name: np.mean(scores[name].get("validation", [0.0])), default=None)
    for results in comparisons:  # each seed's strategies scored the same test rows: differences are paired
        by_name = {r.name: r for r in results if r.error is None}
        for name, result in by_name.items():
            rows = paired_rows(by_name[best].test, result.test) if best in by_name else None
            if rows is not None:
                gaps.setdefault(name, []).append(float(np.mean(rows[2] == rows[0]) - np.mean(rows[1] == rows[0])))
    lines = [f"# Strategies over {count} seeds ({', '.join(map(str, seeds))})", "",
             f"| strategy | val acc, mean ± std | test acc, mean ± std | test acc per seed | test acc − {best or 'best'}, "
             f"paired per seed: mean ± std |", "|---|---|---|---|---|"]
    for name, by_split in scores.items():
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "—"
                 for v in (by_split.get("validation", []), by_split.get("test", []), gaps.get(name, []))]
        each = ", ".join(f"{v:.3f}" for v in by_split.get("test", []))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {each} | {cells[2]} |")
    if best is not None:
        lines += ["", f"{best} has the best mean validation accuracy. The last column is, per seed, this strategy's "
                  f"test accuracy minus {best}'s on the same test rows (— where they did not score the same rows); "
                  f"its spread over seeds is the noise a choice between them has to beat."]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "seeds.json", {"seeds": seeds, "accuracy": scores, "paired_test_gap_vs_best": {
        "against": best, "per_seed": gaps}})
    (out / "seeds.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "seeds.md"
