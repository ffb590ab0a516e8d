"""Strategy bake-off: several ways to get a classifier, on the same splits and seed, in one table.

    zero_shot           prompt a causal LM and score each label's word (prompting.py); no examples
    few_shot            the same with k class-balanced train examples in the prompt's cached prefix
    retrieval_few_shot  the same with each text's k nearest train neighbours as its examples
    knn_retrieval       sentence-encoder embeddings in a FAISS inner-product index; similarity-weighted vote
    linear_probe        frozen encoder features + logistic regression
    setfit              few-shot fine-tuning (the `setfit` package): the encoder tuned contrastively on pairs of
                        train texts, then a logistic-regression head on its embeddings; for 8-64 rows per class
    lora, full          fine-tuning as ordinary classification runs (`tasks.registry.train`; LoRA / all weights)
    from_scratch        `full` on the same architecture and tokenizer with randomly initialised (seeded) weights,
                        the same data and step budget; `from_scratch_3x` trains 3x the steps: what pretraining buys
    sft                 instruction tuning of the prompting model (`task: sft`, LoRA) on the train rows as
                        instructions (`sft.template`, or the prompt's instruction), scored by label continuation

Every strategy gets the same splits (read, checked and subset once, exactly as a classification run does) and
the same seed. Choices (k of the vote, C of the probe, the best checkpoint) are made on validation; test is
predicted once per strategy, after them. Costs are measured per strategy: fit seconds (training, indexing,
prompt prefix and calibration; loading the pretrained weights is not counted), prediction texts/s over the
test split, and peak memory. With `isolate` (the default) each strategy runs alone in a fresh process and its
peak resident set size is exact (`getrusage`), the Python + PyTorch process it started from included (its size
is reported too); in-process it is the peak RSS sampled every 20 ms, which includes whatever the process
already held.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afinar.core.config import CompareArgs, Config, ModelArgs, PromptArgs, set_value, to_yaml
from afinar.core.errors import AfinarError
from afinar.core.models import load_tokenizer, resolve
from afinar.core.runs import earlier_record, peak_memory, read_json, write_atomic, write_json
from afinar.data import sources as data_lib
from afinar.data.checks import checked_splits
from afinar.evaluation.metrics import classification_report, paired_difference, paired_rows
from afinar.experiments.prompting import CONTENT_FREE, PromptClassifier, balanced_shots
from afinar.inference.encoder import Encoder
from afinar.tasks.sft import SFT

log = logging.getLogger(__name__)

STRATEGIES = ("zero_shot", "few_shot", "retrieval_few_shot", "knn_retrieval", "linear_probe", "setfit", "sft", "lora",
              "full", "from_scratch", "from_scratch_3x")
PAIR_STRATEGIES = ("linear_probe", "lora", "full", "from_scratch", "from_scratch_3x")  # the ones that read pairs
FROM_SCRATCH = {"from_scratch": 1, "from_scratch_3x": 3}  # `full` from random weights: times full's optimizer steps
FINE_TUNING = ("lora", "full", *FROM_SCRATCH)  # ordinary training runs (`_fine_tune`)
COST_TEXTS = 10_000  # the recommendation's cost: seconds to fit once and then label this many texts


@dataclass
class StrategyResult:
    name: str
    model: str
    validation: dict | None = None  # `metrics.classification_report` of the headline predictions
    test: dict | None = None
    train_seconds: float = 0.0  # fitting: training, indexing, the prompt's prefix and calibration
    infer_texts_per_s: float | None = None  # over the test split (validation when there is none)
    peak_memory_mb: float | None = None
    base_memory_mb: float | None = None  # the isolated process before the strategy started (Python + PyTorch)
    trainable_params: int = 0
    variants: dict = field(default_factory=dict)  # other predictions' accuracy, e.g. {"raw": {"test": 0.42}}
    details: dict = field(default_factory=dict)  # choices made on validation, run folder, notes
    error: str | None = None

    @property
    def val_accuracy(self) -> float | None:
        return (self.validation or {}).get("accuracy")

    @property
    def test_accuracy(self) -> float | None:
        return (self.test or {}).get("accuracy")


@dataclass
class ComparisonResult:
    path: Path
    results: list[StrategyResult]
    recommended: str | None
    recommendation: str
    rows: dict[str, int]
    label_names: list[str]
    majority_baseline: dict[str, float]  # validation / test: the share of the split's most frequent class
    memory: str  # how peak memory was measured

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


def parse_strategies(text: str | Sequence[str]) -> list[str]:
    """`zero_shot,knn_retrieval` (or a list; `all` is every strategy), checked against `STRATEGIES`."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    names = list(STRATEGIES) if names == ["all"] else names
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise AfinarError(f"unknown strategy {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(STRATEGIES)} or all")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- memory


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux
        return None


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, _rss_mb(), threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak or 0.0, _rss_mb() or 0.0) or None

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak or 0.0, _rss_mb() or 0.0) or None


class NeighbourIndex:
    """Exact inner-product search (cosine on normalised embeddings) over the train texts with FAISS."""

    def __init__(self, encoder: Encoder, texts: Sequence[str]):
        import faiss

        self.encoder = encoder
        embeddings = encoder.encode(texts)
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(embeddings)

    def search(self, texts: Sequence[str], k: int, exclude: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and train row ids, nearest first; `exclude[i]` (a train row) is skipped for text i."""
        embeddings = self.encoder.encode(texts)
        k = min(k, self.index.ntotal - (exclude is not None))
        sims, ids = self.index.search(embeddings, k + (exclude is not None))
        if exclude is not None:
            keep = ids != np.asarray(exclude)[:, None]
            keep[keep.sum(axis=1) > k, -1] = False  # the row itself was not among them: drop the farthest
            sims, ids = sims[keep].reshape(len(texts), k), ids[keep].reshape(len(texts), k)
        return sims, ids


# ---------------------------------------------------------------- strategies that fit and predict


class Strategy:
    """`fit` on train (validation only for choices), then `predict` -> {variant: label ids}, the headline
    first."""

    name = ""
    model = ""
    trainable_params = 0

    def __init__(self):
        self.details: dict = {}

    def fit(self, splits: data_lib.Splits) -> None:
        raise NotImplementedError

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class KnnRetrieval(Strategy):
    name = "knn_retrieval"

    def __init__(self, encoder: Encoder, ks: Sequence[int]):
        super().__init__()
        self.encoder, self.ks, self.model = encoder, sorted(set(ks)), encoder.name

    def _vote(self, sims: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
        scores = np.zeros((len(ids), self.num_classes))
        weights = np.clip(sims[:, :k], 0, None) + 1e-6  # similarity-weighted; a tiny floor keeps plain counts
        np.add.at(scores, (np.arange(len(ids))[:, None], self.labels[ids[:, :k]]), weights)
        return scores.argmax(axis=1)

    def fit(self, splits: data_lib.Splits) -> None:
        self.labels = np.asarray(splits.train["label"])
        self.num_classes = len(splits.label_names)
        self.index = NeighbourIndex(self.encoder, splits.train["text"])
        sims, ids = self.index.search(splits.validation["text"], max(self.ks))
        gold = np.asarray(splits.validation["label"])
        by_k = {k: float((self._vote(sims, ids, k) == gold).mean()) for k in self.ks if k <= ids.shape[1]}
        self.k = max(by_k, key=lambda k: (by_k[k], -k))  # ties: the smaller k
        self.details.update({"k": self.k, "validation_accuracy_by_k": by_k, "index_size": int(self.index.index.ntotal)})

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        sims, ids = self.index.search(texts, self.k)
        return {"knn": self._vote(sims, ids, self.k)}


class LinearProbe(Strategy):
    name = "linear_probe"

    def __init__(self, encoder: Encoder, cs: Sequence[float], seed: int):
        super().__init__()
        self.encoder, self.cs, self.seed, self.model = encoder, sorted(set(cs)), seed, encoder.name

    def fit(self, splits: data_lib.Splits) -> None:
        from sklearn.linear_model import LogisticRegression

        train, labels = self.encoder.features(data_lib.inputs(splits.train)), np.asarray(splits.train["label"])
        validation = self.encoder.features(data_lib.inputs(splits.validation))
        gold = np.asarray(splits.validation["label"])
        fitted, by_c = {}, {}
        for c in self.cs:
            fitted[c] = LogisticRegression(C=c, max_iter=2000, random_state=self.seed).fit(train, labels)
            by_c[c] = float((fitted[c].predict(validation) == gold).mean())
        c = max(by_c, key=lambda c: (by_c[c], -c))  # ties: the stronger regularisation
        self.classifier = fitted[c]
        self.trainable_params = int(self.classifier.coef_.size + self.classifier.intercept_.size)
        self.details.update({"C": c, "validation_accuracy_by_C": {str(k): v for k, v in by_c.items()}})

    def predict(self, texts: list[data_lib.Input]) -> dict[str, np.ndarray]:
        return {"probe": self.classifier.predict(self.encoder.features(texts))}


class SetFit(Strategy):
    """SetFit (Tunstall et al., 2022) through the `setfit` package: pairs of train texts with the same label are
    pulled together and pairs with different labels pushed apart (cosine-similarity loss on the sentence
    encoder, `iterations` pairs per text, at most `max_pairs` in all), then a logistic-regression head is fitted
    on the tuned embeddings. Contrastive pairs multiply a few labelled rows into thousands of training signals,
    which is why it suits 8-64 examples per class."""

    name = "setfit"

    def __init__(self, args: CompareArgs, max_length: int, seed: int, work_dir: Path):
        from setfit import SetFitModel

        super().__init__()
        self.model, self.args, self.max_length, self.seed, self.work_dir = \
            args.encoder, args, max_length, seed, work_dir
        self.classifier = SetFitModel.from_pretrained(resolve(ModelArgs(name=args.encoder)))

    def fit(self, splits: data_lib.Splits) -> None:
        from datasets import Dataset
        from setfit import Trainer, TrainingArguments

        pairs = min(self.args.setfit_iterations * 2 * len(splits.train), self.args.setfit_max_pairs)
        steps = max(1, pairs // self.args.setfit_batch_size)
        arguments = TrainingArguments(output_dir=str(self.work_dir), batch_size=self.args.setfit_batch_size,
                                      num_epochs=1, num_iterations=self.args.setfit_iterations, max_steps=steps,
                                      max_length=self.max_length, seed=self.seed, show_progress_bar=False,
                                      report_to="none", save_strategy="no")
        train = Dataset.from_dict({"text": list(splits.train["text"]), "label": list(splits.train["label"])})
        Trainer(model=self.classifier, args=arguments, train_dataset=train).train()
        head = self.classifier.model_head
        self.trainable_params = sum(p.numel() for p in self.classifier.model_body.parameters()) + \
            int(head.coef_.size + head.intercept_.size)
        self.details.update({"pairs": steps * self.args.setfit_batch_size, "steps": steps,
                             "iterations": self.args.setfit_iterations, "package": "setfit"})

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"setfit": np.asarray(self.classifier.predict(texts, batch_size=self.args.encode_batch,
                                                             as_numpy=True, use_labels=False))}


class Prompting(Strategy):
    """zero_shot, few_shot or retrieval_few_shot with `PromptClassifier`; calibration on train texts (or
    content-free inputs), never on held-out ones."""

    def __init__(self, name: str, args: PromptArgs, label_names: list[str], seed: int, encoder: Encoder | None = None):
        super().__init__()
        self.name, self.args, self.seed, self.encoder = name, args, seed, encoder
        self.model = args.model + (f" + {encoder.name}" if name == "retrieval_few_shot" else "")
        self.classifier = PromptClassifier(args, label_names)

    def _shots_for(self, texts: Sequence[str], exclude: Sequence[int] | None = None) -> list | None:
        if self.name != "retrieval_few_shot":
            return None
        _, ids = self.index.search(texts, self.args.retrieval_shots, exclude=exclude)
        return [[(self.train_texts[j], self.train_labels[j]) for j in row[::-1]] for row in ids]  # nearest last

    def fit(self, splits: data_lib.Splits) -> None:
        self.train_texts, self.train_labels = list(splits.train["text"]), list(splits.train["label"])
        used: set[int] = set()
        if self.name == "few_shot":
            shots = balanced_shots(self.train_texts, self.train_labels, self.args.shots, len(splits.label_names),
                                   self.seed)
            self.classifier.set_prompt(shots)
            used = {i for i, text in enumerate(self.train_texts) if text in {s for s, _ in shots}}
            self.details["shots"] = [{"text": text, "label": splits.label_names[label]} for text, label in shots]
        elif self.name == "retrieval_few_shot":
            self.index = NeighbourIndex(self.encoder, self.train_texts)
            self.classifier.set_prompt(per_text_shots=True)
        self.details.update({"chat_template": self.classifier.chat, "prefix_tokens": len(self.classifier.prefix_ids),
                             "verbalizers": self.classifier.words, "calibration": self.args.calibration})
        if self.args.calibration == "train":
            rows = [i for i in range(len(self.train_texts)) if i not in used]
            rows = random.Random(self.seed).sample(rows, min(self.args.calibration_samples, len(rows)))
            texts = [self.train_texts[i] for i in rows]
            self.classifier.calibrate_on(texts, self._shots_for(texts, exclude=rows))
        elif self.args.calibration == "content_free":
            self.classifier.calibrate_on(list(CONTENT_FREE), self._shots_for(list(CONTENT_FREE)))
        self.details["bias"] = [float(b) for b in self.classifier.bias]

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        predictions = self.classifier.predict(texts, self._shots_for(texts))
        return predictions if self.args.calibration != "none" else {"raw": predictions["raw"]}


def build_strategy(name: str, config: Config, args: CompareArgs, prompt: PromptArgs,
                   label_names: list[str], work_dir: Path) -> Strategy:
    """The strategy with its pretrained weights loaded (not part of its fit time)."""
    if name == "setfit":
        return SetFit(args, config.data.max_length, config.train.seed, work_dir / "setfit")
    needs_encoder = name in ("knn_retrieval", "linear_probe", "retrieval_few_shot")
    encoder = Encoder(args.encoder, config.data.max_length, args.encode_batch) if needs_encoder else None
    if name == "knn_retrieval":
        return KnnRetrieval(encoder, args.knn_k)
    if name == "linear_probe":
        return LinearProbe(encoder, args.probe_c, config.train.seed)
    return Prompting(name, prompt, label_names, config.train.seed, encoder)


def _report(splits: data_lib.Splits, split: str, predictions: np.ndarray) -> dict:
    return classification_report(np.asarray(getattr(splits, split)["label"]), np.asarray(predictions),
                                 splits.label_names)


def _fit_and_predict(strategy: Strategy, splits: data_lib.Splits) -> StrategyResult:
    started = time.perf_counter()
    strategy.fit(splits)
    result = StrategyResult(strategy.name, strategy.model, train_seconds=time.perf_counter() - started)
    log.info("%s fitted in %.1f s", strategy.name, result.train_seconds)
    variants: dict[str, dict] = {}
    headline = ""
    for split in ("validation", "test"):  # test last, once, after every choice
        ds = getattr(splits, split)
        if ds is None:
            continue
        started = time.perf_counter()
        predictions = strategy.predict(data_lib.inputs(ds))
        result.infer_texts_per_s = len(ds) / max(time.perf_counter() - started, 1e-9)
        headline, *others = predictions
        setattr(result, split, _report(splits, split, predictions[headline]))
        log.info("%s %s: accuracy %.4f, %.1f texts/s", strategy.name, split, getattr(result, split)["accuracy"],
                 result.infer_texts_per_s)
        for name in others:
            variants.setdefault(name, {})[split] = float((predictions[name] == np.asarray(ds["label"])).mean())
    result.variants, result.details = variants, {"headline": headline, **strategy.details}
    result.trainable_params = strategy.trainable_params
    return result


# ---------------------------------------------------------------- strategies that train


def _train_in_comparison(name: str, config: Config, overrides: list[str], out_dir: Path) -> tuple[Config, object]:
    """An ordinary training run (`tasks.registry.train`) with `overrides`, in `<out_dir>/runs/<name>`: a comparison
    resumed after a crash continues the run's last checkpoint."""
    from afinar.tasks.registry import train

    config = copy.deepcopy(config)
    for override in overrides:
        set_value(config, *override.split("=", 1))
    run_dir = out_dir / "runs" / name
    config.train.output_dir, config.train.run_name, config.train.resume = str(run_dir.parent), name, run_dir.exists()
    return config, train(config.validate())


def _trained_result(name: str, model: str, trained, splits: data_lib.Splits, overrides: list[str]) -> StrategyResult:
    """A fine-tuning strategy's row from its run: held-out scores, fit time, parameters, and a warning when the
    run's splits are not the comparison's."""
    metrics = trained.metrics
    result = StrategyResult(name, model, validation=metrics["validation"], test=metrics.get("test"),
                            train_seconds=metrics["train"]["seconds"],
                            trainable_params=metrics["train"]["trainable_parameters"])
    rows = read_json(trained.run_dir / "manifest.json")["data"]["rows"]
    if rows != {split: len(ds) for split, ds in splits.items()}:
        result.details["warning"] = f"the run's splits differ from the comparison's: {rows}"
    result.details.update({"run_dir": str(trained.run_dir), "steps": metrics["train"]["steps"],
                           "total_parameters": metrics["train"]["total_parameters"], "overrides": overrides})
    return result


def _full_steps(config: Config, args: CompareArgs, rows: int) -> int:
    """The optimizer steps `full` plans on `rows` training rows: its overrides, its task's changes, then the unset
    settings scaled to the data, as its run resolves them (`training.scaling`)."""
    from afinar.tasks.registry import for_config
    from afinar.training.scaling import planned_steps, scale_to_data

    config = copy.deepcopy(config)
    for override in args.full_overrides:
        set_value(config, *override.split("=", 1))
    task = for_config(config)
    task.configure(config)
    scale_to_data(config, rows, task.lora_task_type)
    return planned_steps(rows, config.train)


def _fine_tune(name: str, config: Config, args: CompareArgs, splits: data_lib.Splits, out_dir: Path) -> StrategyResult:
    """LoRA, full, or full from random weights (`FROM_SCRATCH`) through the core training path; its run folder
    holds the model and curves."""
    from afinar.inference.predictors import Classifier

    overrides = list(args.lora_overrides if name == "lora" else args.full_overrides)
    factor, budget = FROM_SCRATCH.get(name), None
    if factor:  # `full`'s run from random weights; above 1x, with that many times the steps `full` plans
        overrides.append("model.from_scratch=true")
        if factor > 1:
            budget = factor * _full_steps(config, args, len(splits.train))
            log.info("%s: %dx the optimizer steps full plans on these rows: %d", name, factor, budget)
            overrides.append(f"train.max_steps={budget}")
    config, trained = _train_in_comparison(name, config, overrides, out_dir)
    result = _trained_result(name, config.model.name + (" (random init)" if factor else ""), trained, splits,
                             overrides)
    if budget:
        result.details["budget"] = (f"{budget:,} optimizer steps ({factor}x full's plan on these rows); "
                                    f"took {result.details['steps']:,}")
    texts = data_lib.inputs(splits.test or splits.validation)  # prediction speed of the saved model
    classifier = Classifier(trained.run_dir / "model", config.data.max_length)
    started = time.perf_counter()
    classifier.scores(texts)
    result.infer_texts_per_s = len(texts) / max(time.perf_counter() - started, 1e-9)
    return result


def _instruction_tune(config: Config, args: CompareArgs, prompt: PromptArgs, splits: data_lib.Splits, out_dir: Path
                      ) -> StrategyResult:
    """LoRA instruction tuning of the prompting model on the same rows, as instructions; its held-out scores are
    accuracies of label continuations (constrained), so the row is comparable with the head and the prompts."""
    config = copy.deepcopy(config)
    config.task, config.model = SFT.name, ModelArgs(name=prompt.model)
    if not config.sft.template:
        config.sft.template = prompt.instruction + "\n\nText: {text}"
    config, trained = _train_in_comparison("sft", config, args.sft_overrides, out_dir)
    result = _trained_result("sft", prompt.model, trained, splits, args.sft_overrides)
    scored = trained.metrics.get("test") or trained.metrics["validation"]
    result.infer_texts_per_s = scored.get("texts_per_second")  # label continuations scored, texts/s
    skipped = {split: trained.metrics[split]["rows_skipped"] for split in ("validation", "test")
               if (trained.metrics.get(split) or {}).get("rows_skipped")}
    if skipped:  # their accuracy is over fewer rows than the other strategies', and cannot be paired with them
        result.details["warning"] = "; ".join(filter(None, [
            result.details.get("warning"), f"prompts that could not fit data.max_length were skipped, not scored: "
                                           f"{', '.join(f'{n:,} {split}' for split, n in skipped.items())} rows"]))
    result.details.update({"template": config.sft.template, "free_generation": trained.metrics.get("free_generation")})
    return result


def run_strategy(name: str, config: Config, splits: data_lib.Splits, out_dir: Path, args: CompareArgs | None = None,
                 prompt: PromptArgs | None = None) -> StrategyResult:
    """One strategy, in this process, on `splits`; seeded with `train.seed`."""
    from transformers import set_seed

    args, prompt = args or CompareArgs(), prompt or PromptArgs()
    if data_lib.has_pairs(splits.train) and name not in PAIR_STRATEGIES:
        raise AfinarError(f"strategy {name} reads one text per row; these data are sentence pairs: compare "
                          f"{', '.join(PAIR_STRATEGIES)}")
    set_seed(config.train.seed)
    with PeakRSS() as memory:
        if name in FINE_TUNING:
            result = _fine_tune(name, config, args, splits, out_dir)
        elif name == "sft":
            result = _instruction_tune(config, args, prompt, splits, out_dir)
        else:
            result = _fit_and_predict(build_strategy(name, config, args, prompt, splits.label_names, out_dir),
                                      splits)
    result.peak_memory_mb = memory.peak
    return result


def _isolated(name: str, config: Config, splits: data_lib.Splits, out_dir: Path, args: CompareArgs,
              prompt: PromptArgs) -> StrategyResult:
    """`run_strategy` in a fresh process (the child of `compare`): peak RSS from the kernel, and its baseline."""
    package = logging.getLogger("afinar")
    if not package.handlers:  # a spawned process starts without the command line's logging set-up
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
    base = _rss_mb()
    result = run_strategy(name, config, splits, out_dir, args, prompt)
    result.peak_memory_mb = peak_memory()["peak_host_memory_mb"]  # this spawned process's own peak
    result.base_memory_mb = base
    return result


# ---------------------------------------------------------------- the comparison


def recommend(results: list[StrategyResult], tolerance_points: float = 1.0,
              majority: float | None = None) -> tuple[str | None, str]:
    """The cheapest strategy within `tolerance_points` of the best *validation* accuracy (test plays no part);
    cost = fit seconds + seconds to label `COST_TEXTS` texts."""
    done = [r for r in results if r.error is None and r.val_accuracy is not None]
    if not done:
        return None, "No strategy finished, so there is nothing to recommend."

    def cost(r: StrategyResult) -> float:
        return r.train_seconds + (COST_TEXTS / r.infer_texts_per_s if r.infer_texts_per_s else float("inf"))

    best = max(done, key=lambda r: r.val_accuracy)
    close = [r for r in done if r.val_accuracy >= best.val_accuracy - tolerance_points / 100]
    choice = min(close, key=cost)
    text = [f"**{choice.name}** ({choice.model})."]
    if choice is best:
        text.append(f"It has the best validation accuracy ({best.val_accuracy:.3f})"
                    + (" and is also the cheapest within "
                       f"{tolerance_points:g} point of it." if len(close) > 1 else ", and nothing else comes within "
                       f"{tolerance_points:g} point of it."))
    else:
        text.append(f"Its validation accuracy ({choice.val_accuracy:.3f}) is within {tolerance_points:g} point of the "
                    f"best ({best.name}: {best.val_accuracy:.3f}) and it is the cheapest of those: "
                    f"{choice.train_seconds:.0f} s to fit and {cost(choice):.0f} s to fit and label {COST_TEXTS:,} "
                    f"texts, against {best.train_seconds:.0f} s and {cost(best):.0f} s for {best.name}.")
    runner_up = max((r for r in done if r is not best), key=lambda r: r.val_accuracy, default=None)
    paired = paired_rows(best.validation, runner_up.validation) if runner_up is not None else None
    if paired is not None:
        gold, best_predictions, runner_predictions = paired
        gap = paired_difference(gold, runner_predictions, best_predictions, len(best.validation["labels"]))["accuracy"]
        low, high = gap["ci95"]
        text.append(f"On the same validation rows {best.name} is {100 * gap['delta']:+.1f} points of accuracy above "
                    f"{runner_up.name} (95% paired bootstrap interval {100 * low:+.1f} to {100 * high:+.1f}): "
                    + ("within noise, so the two are not told apart." if gap["within_noise"] else
                       "a difference beyond noise."))
    elif runner_up is not None:
        text.append(f"{best.name} and {runner_up.name}, the best two on validation, did not record scoring the "
                    f"same rows (an earlier afinar's result, or rows skipped), so no paired comparison says whether "
                    f"their {100 * (best.val_accuracy - runner_up.val_accuracy):.1f}-point gap is noise.")
    if choice.test_accuracy is not None:
        text.append(f"Its test accuracy is {choice.test_accuracy:.3f}"
                    + (f" (majority class: {majority:.3f})." if majority is not None else "."))
    if majority is not None:
        weak = [r.name for r in done if r.test_accuracy is not None and r.test_accuracy <= majority]
        if weak:
            text.append(f"Not better than always answering the majority class on test: {', '.join(weak)}.")
    failed = [r.name for r in results if r.error is not None]
    if failed:
        text.append(f"Failed: {', '.join(failed)} (see comparison.json).")
    return choice.name, " ".join(text)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(result: ComparisonResult) -> str:
    from afinar.reporting.pages import COLUMNS, PAIRED_LEGEND, comparison_rows

    rows = result.rows
    lines = [f"# Strategy comparison ({', '.join(result.label_names)})", "",
             f"Same splits and seed for every strategy: {rows.get('train', 0):,} train, {rows.get('validation', 0):,} "
             f"validation, {rows.get('test', 0):,} test rows. Majority class: validation "
             f"{result.majority_baseline.get('validation', float('nan')):.3f}, test "
             f"{result.majority_baseline.get('test', float('nan')):.3f}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |"
              for cells in comparison_rows([dataclasses.asdict(r) for r in result.results])]
    warnings = [f"- {r.name}: {r.details['warning']}" for r in result.results if r.details.get("warning")]
    lines += ["", "Warnings:", *warnings] if warnings else []
    bases = sorted({round(r.base_memory_mb) for r in result.results if r.base_memory_mb})
    held = f"{bases[0]:,}" if len(bases) == 1 else f"{bases[0]:,}–{bases[-1]:,}" if bases else ""
    lines += ["", f"Peak memory: {result.memory}" + (f" (that process held {held} MB before the strategy started)."
                                                     if bases else "."),
              PAIRED_LEGEND,
              "Train time: fine-tuning, indexing, or the prompt's cached prefix and calibration (loading pretrained "
              "weights not counted). Prompting rows show "
              "calibrated accuracy (each class's mean score on train texts subtracted) and raw accuracy in brackets.",
              "", "## Recommendation", "", result.recommendation, ""]
    return "\n".join(lines)


def experiment_folder(config: Config, out_dir: str | Path | None, kind: str) -> Path:
    """`out_dir`, or `<train.output_dir>/<kind>-<time>` when none is given."""
    return Path(out_dir or Path(config.train.output_dir) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def checked_into(out: Path, config: Config) -> data_lib.Splits:
    """Start an experiment's folder: the resolved config, then the data read and checked once (the report beside
    it); every strategy or curve point shares the splits returned."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", to_yaml(config))
    splits, report = checked_splits(config, load_tokenizer(config.model))
    write_json(out / "data_report.json", report.to_dict())
    return splits


def _earlier_results(out: Path, config: Config, resume: bool) -> dict[str, StrategyResult]:
    """The strategies an earlier `compare` into `out` finished (with `resume`, and the same configuration); the
    ones it lacks or that failed run again."""
    saved = earlier_record(out, "comparison.json", config, resume, "a comparison")
    return {} if saved is None else {r["name"]: StrategyResult(**r) for r in saved["results"] if not r.get("error")}


def _pair_with_best(results: list[StrategyResult]) -> None:
    """Each finished strategy's test accuracy and macro-F1 minus the validation-best strategy's, on the same
    test rows, with 95% paired bootstrap intervals (`details["paired_vs_best"]`): what the table shows beside
    each row, so a gap is read against the noise of a paired comparison, not of two separate intervals."""
    done = [r for r in results if r.error is None and r.val_accuracy is not None]
    if not done:
        return
    best = max(done, key=lambda r: r.val_accuracy)
    for result in done:
        if result is best:
            result.details["paired_vs_best"] = {"against": best.name}
            continue
        paired = paired_rows(best.test, result.test)
        if paired is None:
            result.details.pop("paired_vs_best", None)
            continue
        gold, best_predictions, predictions = paired
        result.details["paired_vs_best"] = {"against": best.name, **paired_difference(
            gold, best_predictions, predictions, len(best.test["labels"]))}


def _summarise(out: Path, results: list[StrategyResult], splits: data_lib.Splits, args: CompareArgs
               ) -> ComparisonResult:
    majority = {split: float(np.bincount(ds["label"]).max() / len(ds)) for split, ds in splits.items()
                if split != "train" and len(ds)}
    recommended, text = recommend(results, args.tolerance_points, majority.get("test", majority.get("validation")))
    _pair_with_best(results)
    return ComparisonResult(out, results, recommended, text, {split: len(ds) for split, ds in splits.items()},
                            splits.label_names, majority,
                            "the peak resident set size of a process that ran the strategy alone" if args.isolate
                            else "the peak resident set size of the shared process, sampled every 20 ms")


def compare(config: Config, strategies: Sequence[str] | str, out_dir: str | Path | None = None,
            args: CompareArgs | None = None, prompt: PromptArgs | None = None, resume: bool = False
            ) -> ComparisonResult:
    """Run `strategies` on the same splits and seed; write comparison.json, comparison.md and report.html into
    `out_dir` (default `<train.output_dir>/compare-<time>`), and recommend one. A strategy that fails is
    recorded as failed and the others still run. The table is rewritten after every strategy, so a killed
    comparison loses only the strategy it was running: `resume` reruns just the strategies that are missing
    or failed (a fine-tuning run continues from its last checkpoint). With `args.isolate` each strategy runs
    in a spawned process, so a script that calls `compare` needs the usual `if __name__ == "__main__":` guard."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from afinar.reporting.pages import write_comparison_report
    from afinar.tasks.registry import require

    require(config, "compares", "compare")
    names = parse_strategies(strategies)
    args, prompt = args or config.compare, prompt or config.prompt
    config = copy.deepcopy(config).validate()
    out = experiment_folder(config, out_dir, "compare")
    earlier = _earlier_results(out, config, resume)
    splits = checked_into(out, config)
    results: list[StrategyResult] = []
    for name in names:
        if name in earlier:
            log.info("strategy %s: kept from the earlier comparison in %s", name, out)
            results.append(earlier[name])
            continue
        log.info("strategy %s (%d of %d)", name, len(results) + 1, len(names))
        try:
            if args.isolate:
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                    result = pool.submit(_isolated, name, config, splits, out, args, prompt).result()
            else:
                result = run_strategy(name, config, splits, out, args, prompt)
        except Exception as exc:  # one failed strategy must not lose the others' results
            log.error("strategy %s failed:\n%s", name, traceback.format_exc())
            result = StrategyResult(name, "", error=f"{type(exc).__name__}: {str(exc).strip()}")
        results.append(result)
        if config.train.report_to and result.error is None and name not in (*FINE_TUNING, "sft"):
            from afinar.reporting.trackers import log_strategy

            log_strategy(out, config.train.report_to, dataclasses.asdict(result))
        log.info("%s: validation accuracy %s, test accuracy %s", name, _cell(result.val_accuracy),
                 _cell(result.test_accuracy))
        write_json(out / "comparison.json", _summarise(out, results, splits, args).to_dict())  # progress
    comparison = _summarise(out, results, splits, args)
    write_json(out / "comparison.json", comparison.to_dict())
    write_atomic(out / "comparison.md", markdown(comparison))
    write_comparison_report(out)
    return comparison
