"""Over- or under-fitting, read from a run's training and validation curves (`Trainer.state.log_history`)."""

from __future__ import annotations

from dataclasses import dataclass

RISES = 2  # consecutive validation-loss rises at the end that count as over-fitting ...
RISE_MARGIN = 0.02  # ... when the last is also this much (relative) above the minimum
FLAT = 0.10  # a loss that fell by less than this share of its first value is flat
NEAR_MAJORITY = 0.02  # best validation accuracy within this of the majority class: nothing useful learnt


@dataclass
class Diagnosis:
    verdict: str  # "over-fitting" | "under-fitting" | "good fit" | "too short to tell"
    reasons: list[str]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def diagnose(log_history: list[dict], majority_baseline: float | None = None) -> Diagnosis:
    """Read the training curves (`Trainer.state.log_history` rows: `loss`, `eval_loss`, `eval_accuracy`,
    `step`). Over-fitting: validation loss rose for the last `RISES` evaluations, ends `RISE_MARGIN` above its
    minimum, while training loss kept falling. Under-fitting: the best validation accuracy is within
    `NEAR_MAJORITY` of the majority class (or, without a baseline, both losses are flat)."""
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
    accuracies = [row["eval_accuracy"] for row in evals if row.get("eval_accuracy") is not None]
    best_accuracy = max(accuracies) if accuracies else None
    above = None if best_accuracy is None or majority_baseline is None else best_accuracy - majority_baseline
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
    if above is not None and above <= NEAR_MAJORITY:
        return Diagnosis("under-fitting", [
            f"best validation accuracy {best_accuracy:.3f} is within {NEAR_MAJORITY * 100:g} points of always "
            f"answering the majority class ({majority_baseline:.3f}): nothing useful was learnt",
            ("both losses are flat" if train_drop < FLAT and val_drop < FLAT else "the losses fall, but not far "
             "enough") + f" ({curves})",
            "train longer, raise the learning rate, unfreeze layers, or use a larger model"])
    if above is None and train_drop < FLAT and val_drop < FLAT:
        return Diagnosis("under-fitting", [f"both losses are flat ({curves})",
                                           "train longer, raise the learning rate, or use a larger model"])
    reasons = [curves]
    if above is not None:
        reasons.insert(0, f"best validation accuracy {best_accuracy:.3f}, {above * 100:.1f} points above the "
                          f"majority class ({majority_baseline:.3f})")
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
