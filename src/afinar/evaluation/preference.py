"""What preference tuning achieved on held-out pairs, from each pair's summed log-probabilities of its chosen and
rejected answers under the tuned policy and the reference it started from (the base model).

- preference accuracy: the share of pairs where the policy prefers the chosen answer more than the reference
  does, i.e. DPO's implicit reward margin beta x [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) -
  log ref(rejected))] is positive (TRL's `rewards/accuracies`). Before tuning the policy is the reference and every
  margin is 0: a tie, counted half, so "before" is 0.5 on every pair and the gain is paired by construction.
- likelihood accuracy: the share of pairs where the model itself gives the chosen answer the higher
  log-probability, for the base model and the tuned one on the same pairs (the stricter test: the tuned model
  now ranks the answers as the data does).
- mean reward margin (0 before), and the held-out DPO loss -log sigmoid(margin) (log 2 before).

Each figure has a 95% bootstrap interval over pairs; gains are paired (each resample takes the same pairs before
and after, `metrics.mean_interval` of the per-pair differences).
"""

from __future__ import annotations

import math

import numpy as np

from afinar.evaluation.metrics import mean_interval

__all__ = ["preference_report", "report_lines"]


def _won(margin: np.ndarray) -> np.ndarray:
    """1 where the margin is positive, 0 where negative, 0.5 for a tie."""
    return (margin > 0) + 0.5 * (margin == 0)


def _gain(before: np.ndarray, after: np.ndarray) -> dict:
    return {"delta": float((after - before).mean()), "ci95": mean_interval(after - before)}


def preference_report(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float) -> dict:
    """The figures above from per-pair summed log-probabilities (arrays of one value per pair)."""
    pc, pr, rc, rr = (np.asarray(a, dtype=np.float64) for a in
                      (policy_chosen, policy_rejected, reference_chosen, reference_rejected))
    margin = beta * ((pc - rc) - (pr - rr))
    won = _won(margin)
    chance = np.full(len(margin), 0.5)
    before, after = _won(rc - rr), _won(pc - pr)
    loss = np.logaddexp(0.0, -margin)  # -log sigmoid(margin), stable
    return {"n": len(margin),
            "loss": float(loss.mean()), "loss_before": math.log(2),
            "accuracy": float(won.mean()), "accuracy_before": 0.5,
            "reward_margin": float(margin.mean()),
            "likelihood_accuracy": float(after.mean()), "likelihood_accuracy_before": float(before.mean()),
            "ci95": {"accuracy": mean_interval(won), "reward_margin": mean_interval(margin),
                     "likelihood_accuracy": mean_interval(after), "likelihood_accuracy_before": mean_interval(before),
                     "loss": mean_interval(loss)},
            "gain": {"accuracy": _gain(chance, won), "reward_margin": _gain(np.zeros_like(margin), margin),
                     "likelihood_accuracy": _gain(before, after)},
            "rows": {"policy_chosen": pc.tolist(), "policy_rejected": pr.tolist(),
                     "reference_chosen": rc.tolist(), "reference_rejected": rr.tolist()}}


def _interval(values: list[float], digits: int) -> str:
    return f"[{values[0]:+.{digits}f}, {values[1]:+.{digits}f}]"


def report_lines(split: str, report: dict) -> list[str]:
    """Before -> after, each with its interval and the paired gain's, as printed lines."""
    ci, gain = report["ci95"], report["gain"]

    def excludes_zero(key: str) -> str:
        low, high = gain[key]["ci95"]
        return "excludes 0" if low > 0 or high < 0 else "includes 0"

    return [f"{split} ({report['n']:,} pairs): preference accuracy (policy prefers chosen more than the reference) "
            f"0.5000 -> {report['accuracy']:.4f} [{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}], gain "
            f"{gain['accuracy']['delta']:+.4f} {_interval(gain['accuracy']['ci95'], 4)} paired "
            f"({excludes_zero('accuracy')})",
            f"  mean reward margin 0 -> {report['reward_margin']:+.4f} {_interval(ci['reward_margin'], 4)} "
            f"({excludes_zero('reward_margin')}); DPO loss {report['loss_before']:.4f} -> {report['loss']:.4f}",
            f"  likelihood accuracy (chosen more probable than rejected) {report['likelihood_accuracy_before']:.4f} -> "
            f"{report['likelihood_accuracy']:.4f}, gain {gain['likelihood_accuracy']['delta']:+.4f} "
            f"{_interval(gain['likelihood_accuracy']['ci95'], 4)} paired ({excludes_zero('likelihood_accuracy')})"]
