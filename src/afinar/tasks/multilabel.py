"""Multi-label classification (`task: multilabel`): a text carries any number of labels (GoEmotions: 28 emotions).

Labels come as a column of label sets (lists, JSON lists, `a,b` or `a|b` text, names or ids; ids are named by
`data.label_names_file`, or a `labels.txt` beside the training file) or as several 0/1 columns
(`data.label_columns`). The model is the encoder, mean pooling over its tokens and a linear head with a sigmoid
per label under binary cross-entropy; the head learns at `train.head_learning_rate`. This checkpoint's stock
`[CLS]`-pooler head never leaves the label prior under BCE (FACTS.md), while mean pooling (how the sentence
encoder was trained) learns. Decision thresholds are tuned on validation (one global and one per label with at
least `MIN_POSITIVES` validation positives, each maximising F1); test is scored once with them, validation with
thresholds cross-fitted on its halves. The thresholds travel with the model (`thresholds.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from afinar.core.config import Config, DataArgs
from afinar.core.errors import AfinarError
from afinar.core.runs import Run, write_json
from afinar.data import sources as data_lib
from afinar.data.checks import apply_policies, format_report, run_checks_cached
from afinar.evaluation.diagnosis import Baseline
from afinar.reporting import pages
from afinar.tasks.base import Task
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
THRESHOLDS_TUNED = "tuned on validation"
THRESHOLDS_CROSS_FITTED = "cross-fitted: each half of validation scored with thresholds tuned on the other half"
GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)  # candidate thresholds
MIN_POSITIVES = 5  # validation positives a label needs for a threshold of its own


# ---------------------------------------------------------------- data


def _label_set(value, where: str) -> list[str]:
    """One cell as a list of label strings: a list, a JSON list, or text split on `|` or `,`; empty -> []."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v).strip() for v in json.loads(text) if str(v).strip()]
        except json.JSONDecodeError:
            raise AfinarError(f"{where}: label cell {text[:40]!r} starts like a JSON list but is not one") from None
    separator = "|" if "|" in text else ","
    return [part.strip() for part in text.split(separator) if part.strip()]


def _names_file(args: DataArgs, train_source: str) -> list[str] | None:
    path = Path(args.label_names_file) if args.label_names_file else Path(train_source).with_name("labels.txt")
    if not path.is_file():
        if args.label_names_file:
            raise AfinarError(f"data.label_names_file {path} does not exist")
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _label_sets(frame: pd.DataFrame, args: DataArgs, where: str) -> list[list[str]]:
    if args.label_columns:
        missing = [c for c in args.label_columns if c not in frame.columns]
        if missing:
            raise AfinarError(f"{where}: no column {missing[0]!r} (data.label_columns); columns seen: "
                              f"{', '.join(map(str, frame.columns))}")
        flags = frame[args.label_columns].apply(pd.to_numeric, errors="coerce")
        if flags.isna().any().any() or not flags.isin([0, 1]).all().all():
            raise AfinarError(f"{where}: data.label_columns must hold 0 or 1 in every row")
        return [[c for c in args.label_columns if row[c] == 1] for _, row in flags.iterrows()]
    column = data_lib.pick_column(frame, args.label_column, data_lib.LABEL_COLUMNS, "label", where,
                                  "data.label_column")
    return [_label_set(value, f"{where} row {i + 1}") for i, value in enumerate(frame[column])]


def read_multilabel_splits(config: Config, with_test: bool = True) -> data_lib.Splits:
    """Splits with `text`, `labels` (label ids) and `label` (0: the checks judge texts, not label sets)."""
    args = config.data
    frames, sources, fingerprints = data_lib.split_frames(args, with_test)
    sets = {split: _label_sets(frame, args, sources[split]) for split, frame in frames.items()}
    names = list(args.label_columns) if args.label_columns else _names_file(args, sources["train"])
    seen = sorted({label for split in sets.values() for row in split for label in row})
    if names is None:
        names = sorted(seen, key=lambda n: (int(n), n) if n.isdigit() else (1 << 62, n))
    elif all(label.isdigit() for label in seen):  # ids into the names file
        outside = [label for label in seen if int(label) >= len(names)]
        if outside:
            raise AfinarError(f"label id {outside[0]} has no name: the names file lists {len(names)} labels")
        sets = {split: [[names[int(label)] for label in row] for row in rows] for split, rows in sets.items()}
    index = {name: i for i, name in enumerate(names)}
    datasets = {}
    for split, frame in frames.items():
        unknown = next((label for row in sets[split] for label in row if label not in index), None)
        if unknown is not None:
            raise AfinarError(f"{sources[split]}: label {unknown!r} is not among the labels ({', '.join(names[:10])}"
                              f"{', ...' if len(names) > 10 else ''})")
        text_column, pair_column = data_lib.text_columns(frame, args, sources[split])
        if pair_column is not None:
            raise AfinarError(f"{sources[split]}: sentence pairs are not supported for multi-label data")
        texts = frame[text_column].map(lambda t: "" if t is None or (isinstance(t, float) and pd.isna(t)) else str(t))
        datasets[split] = Dataset.from_dict({"text": texts.tolist(), "label": [0] * len(frame),
                                             "labels": [[index[n] for n in row] for row in sets[split]]})
    return data_lib.Splits(datasets["train"], datasets.get("validation"), datasets.get("test"), names, sources,
                           fingerprints, [])


def _for_checks(splits: data_lib.Splits) -> data_lib.Splits:
    """The splits as the text checks see them: one class, so class balance and imbalance advice (which read
    `label`) stay out of it; the label sets are profiled by `label_profile`."""
    return dataclasses.replace(splits, label_names=["(label sets)"])


def label_profile(splits: data_lib.Splits) -> dict:
    """Per split: rows per label, rows with no label, mean labels per row; and labels train never has."""
    profile = {}
    for name, ds in splits.items():
        rows = ds["labels"]
        counts = np.bincount([i for row in rows for i in row], minlength=len(splits.label_names))
        profile[name] = {"counts": dict(zip(splits.label_names, counts.tolist())),
                         "empty": sum(not row for row in rows), "cardinality": float(np.mean([len(r) for r in rows]))}
    never = [n for n, c in profile["train"]["counts"].items() if c == 0]
    return {"splits": profile, "never_in_train": never}


def check_multilabel(config: Config) -> str:
    """`afinar check` for multi-label data: the usual checks on the texts, then the label profile, as text."""
    from afinar.core.models import load_tokenizer
    from afinar.data.checks import run_checks

    splits = read_multilabel_splits(config)
    report = run_checks(_for_checks(splits), config.checks, load_tokenizer(config.model), config.data.max_length)
    apply_policies(splits, report, config.checks)
    profile = label_profile(splits)
    lines = [format_report(report), "", "labels (rows per label; no label; mean labels per row):"]
    for name, split in profile["splits"].items():
        rare = sorted(split["counts"].items(), key=lambda item: item[1])[:3]
        lines.append(f"  {name}: {len(split['counts'])} labels, rarest {', '.join(f'{n} {c:,}' for n, c in rare)}; "
                     f"{split['empty']:,} rows without a label; {split['cardinality']:.2f} labels per row")
    if profile["never_in_train"]:
        lines.append(f"  labels never in train: {', '.join(profile['never_in_train'])}")
    return "\n".join(lines)


def _multi_hot(rows: list[list[int]], classes: int) -> list[list[float]]:
    out = np.zeros((len(rows), classes), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, row] = 1.0
    return out.tolist()


def positive_weights(setting: str, rows: list[list[int]], label_names: list[str]) -> list[float] | None:
    """`train.class_weights` for multi-label data, as BCE's `pos_weight`: balanced -> negatives / positives per
    label; `name=weight,...` -> those (1 elsewhere); none -> None."""
    from afinar.tasks.classification import named_weights

    if setting == "none":
        return None
    if setting != "balanced":
        return named_weights(setting, label_names)
    positives = np.bincount([i for row in rows for i in row], minlength=len(label_names))
    if (positives == 0).any():
        raise AfinarError(f"train.class_weights=balanced: label {label_names[int(np.argmin(positives))]!r} has no "
                          f"training rows")
    return ((len(rows) - positives) / positives).tolist()


class WeightedBCE:
    """`Trainer`'s `compute_loss_func`: binary cross-entropy with a positive-class weight per label."""

    def __init__(self, pos_weight: list[float]):
        self.pos_weight = pos_weight

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        weight = torch.tensor(self.pos_weight, dtype=torch.float32, device=logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weight)


# ---------------------------------------------------------------- the model


class MeanPoolingClassifier(PreTrainedModel):
    """Encoder -> mean of its token states over the attention mask -> dropout -> linear, one logit per label.
    Saved as one safetensors file (`encoder.*`, `classifier.*`) beside the encoder's own config."""

    config_class = PretrainedConfig
    base_model_prefix = "encoder"

    def __init__(self, config: PretrainedConfig, encoder: torch.nn.Module | None = None):
        from transformers import AutoModel

        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config)
        self.dropout = torch.nn.Dropout(getattr(config, "hidden_dropout_prob", 0.1))
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.accepts_loss_kwargs = False  # a plain batch mean, as `models.load_classifier` explains
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is getattr(self, "classifier", None):
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **_):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @classmethod
    def from_encoder(cls, path: str, label_names: list[str], pad_token_id: int | None) -> MeanPoolingClassifier:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path, num_labels=len(label_names),
                                            id2label=dict(enumerate(label_names)),
                                            label2id={n: i for i, n in enumerate(label_names)},
                                            problem_type="multi_label_classification")
        config.pad_token_id = pad_token_id
        return cls(config, AutoModel.from_pretrained(path, use_safetensors=True))

    @classmethod
    def load(cls, model_dir: str | Path) -> MeanPoolingClassifier:
        """A saved model folder (safetensors only)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        model = cls(AutoConfig.from_pretrained(model_dir))
        state = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(file))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise AfinarError(f"{model_dir}: the saved weights do not fit a multi-label model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model


# ---------------------------------------------------------------- metrics and thresholds


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def multilabel_report(targets: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> dict:
    """Micro/macro-F1, subset accuracy, label cardinality, per-label precision/recall/F1/support, and the
    text-blind baseline the diagnosis compares macro-F1 with (`text_blind_macro_f1`)."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    targets, predicted = targets.astype(int), predicted.astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, zero_division=0)
    return {"macro_f1": float(f1_score(targets, predicted, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(targets, predicted, average="micro", zero_division=0)),
            "accuracy": float((predicted == targets).all(axis=1).mean()),  # subset accuracy: every label right
            "baseline": Baseline("macro_f1", text_blind_macro_f1(targets), TEXT_BLIND).to_dict(),
            "cardinality": {"true": float(targets.sum(axis=1).mean()),
                            "predicted": float(predicted.sum(axis=1).mean())},
            "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for name, p, r, f, s in zip(label_names, precision, recall, f1, support)},
            "n": int(len(targets))}


TEXT_BLIND = "predicting each label for every row or for none, whichever scores better"


def text_blind_macro_f1(targets: np.ndarray) -> float:
    """The macro-F1 of the best predictor that never reads the text: per label, all rows (F1 = 2p / (1 + p) at
    prevalence p) or none (F1 = 0). Sparse labels make it low, so a model is not called useless for missing
    the commonest label set (mostly the empty one), as subset accuracy against it would."""
    prevalence = targets.astype(float).mean(axis=0) if len(targets) else np.zeros(targets.shape[1])
    return float(np.mean(2 * prevalence / (1 + prevalence)))


def tune_thresholds(targets: np.ndarray, probabilities: np.ndarray) -> tuple[float, np.ndarray]:
    """The global threshold with the best macro-F1, and per label the one with the best F1; a label with fewer
    than `MIN_POSITIVES` positives keeps the global one (one or two rows would pick a threshold by chance)."""
    from sklearn.metrics import f1_score

    targets = targets.astype(int)
    best_global = max(GRID, key=lambda t: (f1_score(targets, (probabilities >= t).astype(int), average="macro",
                                                    zero_division=0), -abs(t - 0.5)))
    per_label = np.full(targets.shape[1], best_global)
    for j in range(targets.shape[1]):
        if targets[:, j].sum() >= MIN_POSITIVES:
            per_label[j] = max(GRID, key=lambda t: (f1_score(targets[:, j], (probabilities[:, j] >= t).astype(int),
                                                             zero_division=0), -abs(t - best_global)))
    return float(best_global), per_label


def cross_fitted(targets: np.ndarray, probabilities: np.ndarray, seed: int, folds: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Predictions for the rows that tune the thresholds, each fold's with thresholds tuned on the other folds:
    per-label and global. Scored with the thresholds they chose themselves, the same rows read optimistic."""
    if len(targets) < folds:  # no half to tune on: the thresholds tuned on these rows, as for test
        best_global, thresholds = tune_thresholds(targets, probabilities)
        return (probabilities >= thresholds).astype(int), (probabilities >= best_global).astype(int)
    order = np.random.default_rng(seed).permutation(len(targets))
    per_label, global_only = np.zeros_like(targets, dtype=int), np.zeros_like(targets, dtype=int)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        best_global, thresholds = tune_thresholds(targets[rest], probabilities[rest])
        per_label[part] = probabilities[part] >= thresholds
        global_only[part] = probabilities[part] >= best_global
    return per_label, global_only


def trainer_metrics(eval_pred) -> dict[str, float]:
    """During training: macro/micro-F1 and subset accuracy at threshold 0.5 (thresholds are tuned at the end)."""
    from sklearn.metrics import f1_score

    logits, targets = eval_pred
    predicted = (sigmoid(np.asarray(logits)) >= 0.5).astype(int)
    targets = np.asarray(targets).astype(int)
    return {"macro_f1": float(f1_score(targets, predicted, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(targets, predicted, average="micro", zero_division=0)),
            "accuracy": float((predicted == targets).all(axis=1).mean())}


# ---------------------------------------------------------------- the task


@dataclass
class _Prepared:
    splits: data_lib.Splits
    profile: dict
    seed: int  # for the validation halves of the cross-fitted thresholds
    thresholds: dict | None = None  # set by `score`, saved by `after_training`


class MultiLabel(Task):
    """Multi-label classification: label sets, a mean-pooling head under BCE, thresholds tuned on validation."""

    name = "multilabel"
    lora_task_type = "SEQ_CLS"
    compute_metrics = staticmethod(trainer_metrics)
    preprocess_logits_for_metrics = None
    pipeline_tag = None  # stock `pipeline("text-classification")` would load a random head and no thresholds
    card_metrics = ("macro_f1", "micro_f1")

    def configure(self, config: Config) -> list[str]:
        notes = []
        if config.train.metric_for_best_model == "accuracy":
            config.train.metric_for_best_model = "macro_f1"
            notes.append("train.metric_for_best_model = macro_f1 (subset accuracy rewards predicting the commonest "
                         "label set)")
        if config.train.head_learning_rate is None:
            config.train.head_learning_rate = 1e-3
            notes.append("train.head_learning_rate = 0.001 (unset; a new head learns faster than the encoder)")
        return notes

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        raw = read_multilabel_splits(config, with_test)
        report = run_checks_cached(_for_checks(raw), config.checks, tokenizer, config.data.max_length)
        splits = data_lib.prepare_splits(apply_policies(raw, report, config.checks), config.data, config.train.seed)
        profile = label_profile(splits)
        log.info("data checks:\n%s", format_report(report))
        notes = list(splits.notes)
        if profile["never_in_train"]:
            notes.append(f"labels with no training row: {', '.join(profile['never_in_train'])}")
        empty = profile["splits"]["train"]["empty"]
        if empty:
            notes.append(f"train: {empty:,} rows carry no label (kept: they teach the model to say none)")
        classes = len(splits.label_names)
        tokenized = {}
        for name, ds in splits.items():
            targets = _multi_hot(ds["labels"], classes)
            tokens = data_lib.tokenize(ds.remove_columns(["labels"]), tokenizer, config.data.max_length)
            tokenized[name] = tokens.remove_columns(["label"]).add_column("labels", targets)
        weights = positive_weights(config.train.class_weights, splits.train["labels"], splits.label_names)
        manifest = {"data": {"sources": splits.sources, "sha256": splits.fingerprints, "labels": splits.label_names,
                             "rows": {name: len(ds) for name, ds in splits.items()}, "multilabel": True},
                    "class_weights": None if weights is None else dict(zip(splits.label_names, weights))}
        return TaskData(tokenized["train"], tokenized["validation"], tokenized.get("test"), manifest, notes,
                        {**report.to_dict(), "labels": profile}, _Prepared(splits, profile, config.train.seed),
                        None if weights is None else WeightedBCE(weights))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        model = MeanPoolingClassifier.from_encoder(model_path, data.extra.splits.label_names, tokenizer.pad_token_id)
        return model

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        prepared: _Prepared = data.extra
        names = prepared.splits.label_names
        outputs = {name: trainer.predict(ds, metric_key_prefix="eval")
                   for name, ds in (("validation", data.validation), ("test", data.test)) if ds is not None}
        probabilities = {name: sigmoid(np.asarray(o.predictions)) for name, o in outputs.items()}
        targets = {name: np.asarray(o.label_ids) for name, o in outputs.items()}
        best_global, per_label = tune_thresholds(targets["validation"], probabilities["validation"])
        prepared.thresholds = {"global": best_global, "per_label": dict(zip(names, per_label.tolist())),
                               "min_positives": MIN_POSITIVES}
        # validation tuned the thresholds: its figures come from thresholds tuned on its other half
        predictions = {name: cross_fitted(targets[name], probabilities[name], prepared.seed) if name == "validation"
                       else (probabilities[name] >= per_label, probabilities[name] >= best_global)
                       for name in outputs}
        scores = {}
        for name in outputs:
            with_per_label, with_global = predictions[name]
            report = multilabel_report(targets[name], with_per_label, names)
            report["global_threshold"] = {k: v for k, v in multilabel_report(targets[name], with_global, names
                                                                             ).items()
                                          if k in ("macro_f1", "micro_f1", "accuracy")}
            report["thresholds"] = THRESHOLDS_CROSS_FITTED if name == "validation" else THRESHOLDS_TUNED
            report["loss"] = float(outputs[name].metrics.get("eval_loss", float("nan")))
            scores[name] = report
        return scores

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        prepared: _Prepared = data.extra
        metrics["thresholds"] = prepared.thresholds
        if run.model_dir.is_dir():
            write_json(run.model_dir / THRESHOLDS_FILE, prepared.thresholds)

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        prepared: _Prepared = data.extra
        lines = [f"# {config.model.name} on {config.data.source} (multi-label, {len(prepared.splits.label_names)} "
                 f"labels)", "", "| split | macro-F1 | micro-F1 | subset accuracy | macro-F1, one threshold | n |",
                 "|---|---|---|---|---|---|"]
        for split in ("validation", "test"):
            if split in metrics:
                m = metrics[split]
                lines.append(f"| {split}{' (cross-fitted thresholds)' if split == 'validation' else ''} | {m['macro_f1']:.4f} | {m['micro_f1']:.4f} | {m['accuracy']:.4f} | "
                             f"{m['global_threshold']['macro_f1']:.4f} | {m['n']:,} |")
        lines += ["", f"Thresholds tuned on validation: one global ({metrics['thresholds']['global']:.2f}) and one "
                      f"per label with at least {MIN_POSITIVES} validation positives (the table's headline; the "
                      f"others keep the global one). Test is scored with them; the validation row with thresholds "
                      f"cross-fitted on its two halves, since scoring rows with the thresholds they chose reads "
                      f"optimistic.", "", "Notes:"] + [f"- {n}" for n in data.notes] + [""]
        return "\n".join(lines)

    # ---------------------------------------------------------------- after training

    def check(self, config: Config) -> tuple[str, dict]:
        return check_multilabel(config), {}

    def result_lines(self, metrics: dict) -> list[str]:
        lines = []
        for split in ("validation", "test"):
            if m := metrics.get(split):
                one = m["global_threshold"]
                lines.append(f"{split}: macro-F1 {m['macro_f1']:.4f}  micro-F1 {m['micro_f1']:.4f}  subset accuracy "
                             f"{m['accuracy']:.4f} (thresholds per label, {m.get('thresholds', THRESHOLDS_TUNED)}; "
                             f"one global threshold: macro-F1 {one['macro_f1']:.4f}, micro-F1 "
                             f"{one['micro_f1']:.4f}; n={m['n']:,})")
        return lines

    def metrics_html(self, metrics: dict) -> str:
        return (pages.metrics_table(metrics, ["macro_f1", "micro_f1", "loss"])
                + f"<p class='muted'>Per-label thresholds. Test: {THRESHOLDS_TUNED}. Validation: "
                  f"{(metrics.get('validation') or {}).get('thresholds', THRESHOLDS_TUNED)}.</p>")

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        return pages.per_label_sections(metrics)

    def card_usage(self, run: Run) -> str:
        return ("Not a stock `transformers` classifier, so this card names no `pipeline_tag`: the weights are the "
                "encoder (`encoder.*`) with a mean-pooling linear head (`classifier.*`) and a sigmoid per label, and "
                "the decision thresholds tuned on validation are in `thresholds.json`. "
                "`AutoModelForSequenceClassification` or `pipeline()` would load the encoder with a random head and "
                "no thresholds. Load it with afinar: `afinar predict RUN \"text\"`, `afinar serve RUN`, or in "
                "Python `afinar.tasks.multilabel.MultiLabelClassifier(\"model/\")`, whose `predict` returns every "
                "label at or above its threshold.")

    def load_predictor(self, run: Run, backend: str = "auto") -> MultiLabelClassifier:
        if backend not in ("torch", "auto"):
            raise AfinarError(f"backend {backend}: multi-label runs are served by torch only")
        return MultiLabelClassifier(run.model_dir, run.config().data.max_length)


# ---------------------------------------------------------------- prediction


class MultiLabelClassifier:
    """A saved multi-label model: `scores` (a probability per label) and `predict` (every label at or above its
    threshold). Same interface as `inference.predictors.Predictor`, so `afinar predict` and the server use it alike."""

    backend = "torch"

    def __init__(self, model_dir: str | Path, max_length: int = 128):
        from afinar.core.config import ModelArgs
        from afinar.core.models import load_tokenizer

        model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(ModelArgs(name=str(model_dir)), str(model_dir))
        self.model = MeanPoolingClassifier.load(model_dir).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        thresholds = json.loads((model_dir / THRESHOLDS_FILE).read_text(encoding="utf-8"))
        self.thresholds = np.array([thresholds["per_label"][n] for n in self.labels])
        self.max_length = max_length

    @torch.inference_mode()
    def scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for index, batch in data_lib.padded_batches(self.tokenizer, texts, batch_size, self.max_length, "pt"):
            out[index] = torch.sigmoid(self.model(**batch).logits.float()).numpy()
        return out

    def predict(self, texts: list[str], batch_size: int = 64) -> list:
        from afinar.inference.predictors import Prediction

        rows = self.scores(texts, batch_size)
        return [Prediction(text, self.labels[int(row.argmax())], dict(zip(self.labels, row.tolist())),
                           [n for n, p, t in zip(self.labels, row, self.thresholds) if p >= t])
                for text, row in zip(texts, rows)]
