"""Over- or under-fitting, read from a run's training and validation curves (`Trainer.state.log_history`)."""

from __future__ import annotations

from dataclasses import dataclass

RISES = 2  # consecutive validation-loss rises at the end that count as over-fitting ...
RISE_MARGIN = 0.02  # ... when the last is also this much (relative) above the minimum
FLAT = 0.10  # a loss that fell by less than this share of its first value is flat
NEAR_BASELINE = 0.02  # best validation score within this of the text-blind baseline: nothing useful learnt
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


@dataclass(frozen=True)
class Baseline:
    """What a model that never reads its input scores on validation: the bar a run must clear to have learnt
    anything. Each task states its own (the majority class for accuracy; for label sets, every label predicted
    for all rows or none, whichever scores better, for macro-F1)."""

    metric: str  # the validation metric it is compared with (logged as `eval_<metric>`)
    value: float
    name: str  # how a report says it: "always answering the majority class"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "name": self.name}


def majority_class(share: float) -> Baseline:
    return Baseline("accuracy", share, "always answering the majority class")


def baseline_of(report: dict | None) -> Baseline | None:
    """A validation report's baseline: its `baseline` record, or the majority class of a run written before."""
    if not report:
        return None
    if report.get("baseline"):
        return Baseline(**report["baseline"])
    return majority_class(report["majority_baseline"]) if report.get("majority_baseline") is not None else None


@dataclass
class Diagnosis:
    verdict: str  # "over-fitting" | "under-fitting" | "good fit" | "too short to tell"
    reasons: list[str]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def diagnose(log_history: list[dict], baseline: Baseline | None = None) -> Diagnosis:
    """Read the training curves (`Trainer.state.log_history` rows: `loss`, `eval_loss`, `eval_<metric>`,
    `step`). Over-fitting: validation loss rose for the last `RISES` evaluations, ends `RISE_MARGIN` above its
    minimum, while training loss kept falling. Under-fitting: the best validation score (the baseline's metric)
    is within `NEAR_BASELINE` of the text-blind `baseline` (or, without one, both losses are flat)."""
    evals = [row for row in log_history if row.get("eval_loss") is not None]
    train = [row for row in log_history if row.get("loss") is not None and row.get("eval_loss") is None]
    if len(evals) < 3 or len(train) < 2:
        return Diagnosis("too short to tell", [
            f"{len(evals)} validation evaluation(s) and {len(train)} training-loss point(s): a trend needs at "
            f"least 3 and 2; evaluate more often (train.eval_every) or train longer."])
    losses = [row["eval_loss"] for row in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    rises = 0
    while rises < len(losses) - 1 and losses[-1 - rises] > losses[-2 - rises]:
        rises += 1
    before_best = [row["loss"] for row in train if row["step"] <= evals[best]["step"]][-3:] or [train[0]["loss"]]
    train_at_best, train_end = _mean(before_best), _mean([row["loss"] for row in train[-3:]])
    train_drop = (train[0]["loss"] - train_end) / max(abs(train[0]["loss"]), 1e-12)
    val_drop = (losses[0] - losses[best]) / max(abs(losses[0]), 1e-12)
    metric = baseline.metric if baseline else "accuracy"
    said = METRIC_NAMES.get(metric, metric)
    scores = [row[f"eval_{metric}"] for row in evals if row.get(f"eval_{metric}") is not None]
    best_score = max(scores) if scores else None
    above = None if best_score is None or baseline is None else best_score - baseline.value
    curves = (f"training loss {train[0]['loss']:.3f} → {train_end:.3f}; validation loss {losses[0]:.3f} → "
              f"minimum {losses[best]:.3f} at step {evals[best]['step']} → {losses[-1]:.3f} at the end")
    if rises >= RISES and losses[-1] > losses[best] * (1 + RISE_MARGIN) and train_end < train_at_best:
        return Diagnosis("over-fitting", [
            f"validation loss rose for the last {rises} evaluations, to {losses[-1] / losses[best] - 1:.0%} above its "
            f"minimum at step {evals[best]['step']}",
            f"training loss kept falling meanwhile ({train_at_best:.3f} → {train_end:.3f}): the model is "
            f"memorising the training set", curves,
            "the run keeps its best validation checkpoint, not the last; fewer epochs, more data, a lower learning "
            "rate, more weight decay or LoRA would over-fit less"])
    if above is not None and above <= NEAR_BASELINE:
        return Diagnosis("under-fitting", [
            f"best validation {said} {best_score:.3f} is within {NEAR_BASELINE * 100:g} points of "
            f"{baseline.name} ({baseline.value:.3f}): nothing useful was learnt",
            ("both losses are flat" if train_drop < FLAT and val_drop < FLAT else "the losses fall, but not far "
             "enough") + f" ({curves})",
            "train longer, raise the learning rate, unfreeze layers, or use a larger model"])
    if above is None and train_drop < FLAT and val_drop < FLAT:
        return Diagnosis("under-fitting", [f"both losses are flat ({curves})",
                                           "train longer, raise the learning rate, or use a larger model"])
    reasons = [curves]
    if above is not None:
        reasons.insert(0, f"best validation {said} {best_score:.3f}, {above * 100:.1f} points above "
                          f"{baseline.name} ({baseline.value:.3f})")
    if best == len(losses) - 1:
        reasons.append("validation loss was still falling at the last evaluation: more training may still help")
    elif losses[-1] > losses[best] * (1 + RISE_MARGIN) and train_end < train_at_best:
        reasons.append(f"validation loss ended {losses[-1] / losses[best] - 1:.0%} above its minimum (step "
                       f"{evals[best]['step']}) while training loss kept falling: early signs of over-fitting; the "
                       f"run keeps its best validation checkpoint")
    elif rises:
        reasons.append(f"validation loss rose at the last {rises} evaluation(s), not (yet) enough to call it "
                       f"over-fitting")
    return Diagnosis("good fit", reasons)
