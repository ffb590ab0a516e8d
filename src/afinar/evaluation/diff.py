"""Why did my result change? `afinar diff RUN_A RUN_B` lists what differs between two runs (resolved settings,
package versions, data, tokenizer and chat template, seed, precision, machine) beside their metric deltas with
a paired bootstrap interval of each difference when both scored the same rows, so a changed score can be
traced to a changed cause, or shown to be within noise."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from afinar.core.config import to_dict
from afinar.core.runs import Run
from afinar.evaluation.metrics import paired_difference, paired_rows

# what a run's output folder, name or resume flag says about its result: nothing
IGNORED = {"train.output_dir", "train.run_name", "train.resume"}
SCORES = ("accuracy", "macro_f1", "micro_f1", "loss", "perplexity")


@dataclass
class RunDiff:
    a: str
    b: str
    differences: dict[str, dict[str, tuple]] = field(default_factory=dict)  # group -> key -> (in a, in b)
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> metric -> a, b, delta, ci95s


def _flat(value: dict, prefix: str = "") -> dict:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out.update(_flat(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _changed(a: dict, b: dict, ignore: set[str] = frozenset()) -> dict[str, tuple]:
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key) != b.get(key)}


def _tokenizer_digest(run: Run) -> dict:
    """Hashes of the saved tokenizer's files (vocabulary, settings, chat template)."""
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "merges.txt", "special_tokens_map.json",
             "chat_template.jinja")
    return {name: hashlib.sha256((run.model_dir / name).read_bytes()).hexdigest()[:16]
            for name in files if (run.model_dir / name).is_file()}


def diff_runs(run_a: str | Path, run_b: str | Path) -> RunDiff:
    a, b = Run.open(run_a), Run.open(run_b)
    manifest_a, manifest_b = a.manifest(), b.manifest()
    result = RunDiff(str(a.path), str(b.path))
    groups = {
        "config": _changed(_flat(to_dict(a.config())), _flat(to_dict(b.config())), IGNORED),
        "versions": _changed(manifest_a.get("versions", {}), manifest_b.get("versions", {})),
        "data": _changed(_flat(manifest_a.get("data", {})), _flat(manifest_b.get("data", {}))),
        "tokenizer": _changed(_tokenizer_digest(a), _tokenizer_digest(b)),
        "precision": _changed({"precision": (manifest_a.get("precision") or {}).get("precision")},
                              {"precision": (manifest_b.get("precision") or {}).get("precision")}),
        "machine": _changed(_flat(manifest_a.get("machine", {})), _flat(manifest_b.get("machine", {}))),
    }
    result.differences = {name: changes for name, changes in groups.items() if changes}
    metrics_a, metrics_b = a.metrics(), b.metrics()
    for split in ("validation", "test"):
        scored_a, scored_b = metrics_a.get(split) or {}, metrics_b.get(split) or {}
        rows = paired_rows(scored_a, scored_b)
        paired = paired_difference(*rows, len(scored_a["labels"])) if rows is not None else {}
        for key in SCORES:
            if isinstance(scored_a.get(key), (int, float)) and isinstance(scored_b.get(key), (int, float)):
                result.metrics.setdefault(split, {})[key] = {
                    "a": scored_a[key], "b": scored_b[key], "delta": scored_b[key] - scored_a[key],
                    "ci95_a": (scored_a.get("ci95") or {}).get(key), "ci95_b": (scored_b.get("ci95") or {}).get(key),
                    "paired_ci95": (paired.get(key) or {}).get("ci95"),
                    "rows_recorded": bool(scored_a.get("rows") and scored_b.get("rows"))}
    return result


def format_diff(diff: RunDiff) -> str:
    lines = [f"A: {diff.a}", f"B: {diff.b}", ""]
    if not diff.differences:
        lines.append("no differences in settings, versions, data, tokenizer, precision or machine")
    for group, changes in diff.differences.items():
        lines.append(f"{group}:")
        lines += [f"  {key}: {before!r} -> {after!r}" for key, (before, after) in changes.items()]
    for split, scores in diff.metrics.items():
        lines.append(f"{split} metrics (B - A):")
        for key, row in scores.items():
            noise = ""
            if row.get("paired_ci95"):
                low, high = row["paired_ci95"]
                noise = (f"; same rows, 95% paired interval [{low:+.4f}, {high:+.4f}]: "
                         + ("within noise" if low <= 0 <= high else "beyond noise"))
            elif row["ci95_a"] and row["ci95_b"]:
                why = "not the same rows" if row.get("rows_recorded") else "a run did not record its rows"
                noise = (f"; {why}, so not paired: 95% intervals [{row['ci95_a'][0]:.4f}, "
                         f"{row['ci95_a'][1]:.4f}] and [{row['ci95_b'][0]:.4f}, {row['ci95_b'][1]:.4f}]")
            lines.append(f"  {key}: {row['a']:.4f} -> {row['b']:.4f} ({row['delta']:+.4f}{noise})")
    return "\n".join(lines)
