"""Extractive question answering (`task: question_answering`), SQuAD format.

Questions are read and their answers checked against their contexts by `data.answers`; the questions are checked
as texts like every task's rows (empty, damaged, duplicated, leaked into validation/test: a row is the question
with its context, so the same question on another paragraph is not a duplicate), and a context that occurs in
train and in a held-out split is counted. Long contexts become overlapping windows; the best span per question
over its windows is the answer. Scores are SQuAD v1.1's official exact match and F1 with bootstrap intervals over
questions, beside the no-training baseline on the same questions (the context sentence with the most words in
common with the question, scored the same way) and the paired difference from it. The best checkpoint has the
best validation F1. After training its runs answer (`afinar predict`, `/predict`) with offsets into the context.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from afinar.core.config import Config, DataArgs, QAArgs
from afinar.core.errors import AfinarError
from afinar.core.models import instantiate
from afinar.core.runs import Run
from afinar.data import answers as qa_data
from afinar.data.checks import apply_policies, format_report, run_checks_cached
from afinar.data.sources import Splits, carve_rows, normalise, subset_list
from afinar.evaluation import squad
from afinar.evaluation.diagnosis import Baseline
from afinar.evaluation.metrics import with_interval
from afinar.reporting import pages
from afinar.tasks.base import NoTestSplit, Task, held_out_predictions
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)

EXAMPLES = 8  # test questions the report shows with their gold and predicted answers
BASELINE = "answering with the context sentence that shares the most words with the question"


def _as_rows(splits: qa_data.QASplits) -> Splits:
    """Each question with its context as one row of text, for the checks every task shares."""
    def rows(questions):
        return None if questions is None else Dataset.from_dict(
            {"text": [f"{q.question}\n{q.context}" for q in questions], "label": [0] * len(questions)})

    return Splits(rows(splits.train), rows(splits.validation), rows(splits.test), ["question"], splits.sources,
                  splits.fingerprints, list(splits.notes))


def _shared_contexts(splits: qa_data.QASplits) -> dict[str, int]:
    """Questions of each held-out split whose context also occurs in train (the same paragraph seen in training)."""
    seen = {normalise(q.context) for q in splits.train}
    return {name: sum(normalise(q.context) in seen for q in questions)
            for name, questions in splits.items() if name != "train"}


def checked_questions(config: Config, with_test: bool = True) -> tuple[qa_data.QASplits, dict, str]:
    """What training sees: questions read and their answers checked, the row checks' policies applied to train,
    validation carved (by context, so a paragraph's questions stay together) when there is none, seeded subsets
    taken; plus the data report as a dict and as text."""
    raw = qa_data.read_question_splits(config.data, with_test)
    for name, questions in raw.items():
        if not questions:
            raise AfinarError(f"{raw.sources.get(name, name)} ({name}) holds no questions")
    rows = _as_rows(raw)
    report = run_checks_cached(rows, config.checks, None, None)
    kept_rows = apply_policies(rows, report, config.checks)
    dropped = {row for action in report.actions if action["action"] == "drop" for row in action["rows"]}
    train = [q for i, q in enumerate(raw.train) if i not in dropped]
    notes, data, seed = list(kept_rows.notes), config.data, config.train.seed
    validation = raw.validation
    if validation is None:
        contexts = sorted({q.context for q in train})
        kept, held, how = carve_rows(len(contexts), data.validation_fraction, seed)
        held_contexts = {contexts[i] for i in held}
        validation = [q for q in train if q.context in held_contexts]
        train = [q for q in train if q.context not in held_contexts]
        notes.append(f"validation carved from train by context: {len(validation):,} questions on {len(held):,} "
                     f"contexts ({data.validation_fraction:.0%}, {how}, seed {seed})")
    splits = qa_data.QASplits(subset_list(train, data.max_train_samples, seed),
                              subset_list(validation, data.max_eval_samples, seed),
                              None if raw.test is None else subset_list(raw.test, data.max_test_samples, seed),
                              raw.sources, raw.fingerprints, notes)
    shared = _shared_contexts(splits)
    record = {**report.to_dict(), "qa": {
        "questions": {name: len(q) for name, q in splits.items()},
        "contexts": {name: len({x.context for x in q}) for name, q in splits.items()},
        "answers_per_question": {name: float(np.mean([len(x.answers) for x in q])) if q else 0.0
                                 for name, q in splits.items()},
        "questions_on_a_train_context": shared}}
    text = format_report(report) + "\n" + "\n".join(
        [f"{name}: {n:,} questions on {record['qa']['contexts'][name]:,} contexts, "
         f"{record['qa']['answers_per_question'][name]:.2f} gold answers per question"
         for name, n in record["qa"]["questions"].items()]
        + [f"{name} questions whose context is also in train: {n:,}" for name, n in shared.items()])
    return splits, record, text


@dataclass
class _Prepared:
    splits: qa_data.QASplits
    features: dict[str, qa_data.Features]
    args: QAArgs
    report_text: str


def _first_answer(question: qa_data.Question) -> tuple[int, int]:
    return question.starts[0], question.starts[0] + len(question.answers[0])


def _predicted_texts(features: qa_data.Features, start_logits: np.ndarray, end_logits: np.ndarray,
                     questions: list[qa_data.Question], args: QAArgs) -> list[str]:
    spans = qa_data.best_spans(features, start_logits, end_logits, [q.context for q in questions], args)
    return [q.context[start:end] for q, (start, end, _) in zip(questions, spans)]


class AnswerMetrics:
    """`Trainer`'s `compute_metrics`: exact match and F1 of the best spans over each validation question's windows."""

    def __init__(self, features: qa_data.Features, questions: list[qa_data.Question], args: QAArgs):
        self.features, self.questions, self.args = features, questions, args

    def __call__(self, eval_prediction) -> dict[str, float]:
        start_logits, end_logits = eval_prediction.predictions[:2]
        predicted = _predicted_texts(self.features, np.asarray(start_logits), np.asarray(end_logits),
                                     self.questions, self.args)
        em, f1 = squad.question_scores(predicted, [q.answers for q in self.questions])
        return {"exact_match": float(em.mean()), "f1": float(f1.mean())}


def baseline_report(questions: list[qa_data.Question]) -> dict:
    """The overlap-sentence baseline scored as the model is."""
    return squad.answer_report([squad.overlap_sentence(q.question, q.context) for q in questions],
                               [q.answers for q in questions], [q.id for q in questions])


def _without_rows(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "rows"}


class QuestionAnswering(Task):
    """SQuAD-format questions, a span-extraction model, official exact match and F1 against a word-overlap
    baseline."""

    name = "question_answering"
    lora_task_type = "QUESTION_ANS"
    best_model_metrics = ("f1", "exact_match", "loss")
    pipeline_tag = "question-answering"
    searches = True
    card_metrics = ("exact_match", "f1")

    def configure(self, config: Config) -> list[str]:
        notes = []
        if config.train.metric_for_best_model == "accuracy":
            config.train.metric_for_best_model = "f1"
            notes.append("train.metric_for_best_model = f1 (SQuAD token F1 of the best span per question)")
        return notes

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        tokenizer.padding_side = "right"  # offsets and positions are read unpadded (saved with it)
        splits, record, text = checked_questions(config, with_test)
        log.info("data checks:\n%s", text)
        features = {name: qa_data.encode_questions(tokenizer, [q.question for q in questions],
                                                   [q.context for q in questions], config.qa,
                                                   [_first_answer(q) for q in questions])
                    for name, questions in splits.items()}
        record["qa"]["windows"] = {name: len(f) for name, f in features.items()}
        notes = list(splits.notes)
        for name, f in features.items():
            longer = len(f) - len(getattr(splits, name))
            if longer:
                notes.append(f"{name}: {longer:,} extra windows for contexts longer than qa.max_seq_length="
                             f"{config.qa.max_seq_length} (stride {config.qa.doc_stride}); each question's best span over "
                             f"its windows is its answer")
        datasets = {name: Dataset.from_dict(f.encodings) for name, f in features.items()}
        manifest = {"data": {"sources": splits.sources, "sha256": splits.fingerprints, "pairs": True,  # (question,
                             "rows": {name: len(q) for name, q in splits.items()},  # context) in, as sentence pairs
                             "windows": {name: len(f) for name, f in features.items()}}}
        return TaskData(datasets["train"], datasets["validation"], datasets.get("test"), manifest, notes, record,
                        _Prepared(splits, features, config.qa, text),
                        compute_metrics=AnswerMetrics(features["validation"], splits.validation, config.qa))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        from transformers import AutoModelForQuestionAnswering

        model = instantiate(AutoModelForQuestionAnswering, model_path, config.model)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        prepared: _Prepared = data.extra
        scores = {}
        for name, output in held_out_predictions(trainer, data):
            questions = getattr(prepared.splits, name)
            start_logits, end_logits = output.predictions[:2]
            predicted = _predicted_texts(prepared.features[name], np.asarray(start_logits), np.asarray(end_logits),
                                         questions, prepared.args)
            report = squad.answer_report(predicted, [q.answers for q in questions], [q.id for q in questions])
            baseline = baseline_report(questions)
            report["loss"] = float(output.metrics.get("eval_loss", float("nan")))
            report["baseline"] = Baseline("f1", baseline["f1"], BASELINE).to_dict()  # the diagnosis' bar
            report["baseline_scores"] = _without_rows(baseline)
            report["vs_baseline"] = {key: squad.paired_difference(baseline, report, key)
                                     for key in ("exact_match", "f1")}
            scores[name] = report
        return scores

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        prepared: _Prepared = data.extra
        t = metrics["train"]
        lines = [f"# {config.model.name} on {config.data.source} (extractive question answering)", "",
                 "- questions: " + ", ".join(f"{name} {len(q):,}" for name, q in prepared.splits.items()),
                 f"- training: {t['seconds']:.0f} s, {t['steps']} steps, {t['samples_per_second']:.1f} windows/s, "
                 f"{t['trainable_parameters']:,} trainable parameters" + (" (LoRA)" if config.lora.enabled else ""),
                 "", "SQuAD v1.1 exact match and F1 (0.45 is SQuAD's 45.0), 95% bootstrap intervals over questions; "
                 "the baseline answers with the context sentence sharing the most words with the question; the "
                 "difference is paired (same questions).", "",
                 "| split | exact match [95% CI] | F1 [95% CI] | baseline EM | baseline F1 | F1 - baseline [95% CI] "
                 "| n |",
                 "|---|---|---|---|---|---|---|"]
        for split in ("validation", "test"):
            if m := metrics.get(split):
                gain = m["vs_baseline"]["f1"]
                lines.append(f"| {split} | {with_interval(m, 'exact_match')} | {with_interval(m, 'f1')} | "
                             f"{m['baseline_scores']['exact_match']:.4f} | {m['baseline_scores']['f1']:.4f} | "
                             f"{gain['delta']:+.4f} [{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}] | {m['n']:,} |")
        lines += ["", "Notes:"] + [f"- {note}" for note in data.notes]
        lines += ["", "## Data checks", "", "```", prepared.report_text, "```", ""]
        return "\n".join(lines)

    # ---------------------------------------------------------------- after training

    def check(self, config: Config) -> tuple[str, dict]:
        _, record, text = checked_questions(config)
        return text, record

    def result_lines(self, metrics: dict) -> list[str]:
        return [f"{split}: exact match {with_interval(m, 'exact_match')}  F1 {with_interval(m, 'f1')}  "
                f"(baseline EM {m['baseline_scores']['exact_match']:.4f} F1 {m['baseline_scores']['f1']:.4f}; F1 "
                f"gain {m['vs_baseline']['f1']['delta']:+.4f} [{m['vs_baseline']['f1']['ci95'][0]:+.4f}, "
                f"{m['vs_baseline']['f1']['ci95'][1]:+.4f}] paired; n={m['n']:,} questions)"
                for split in ("validation", "test") if (m := metrics.get(split))]

    def evaluation_lines(self, report: dict) -> list[str]:
        return [f"{report['data']}: exact match {with_interval(report, 'exact_match')}  F1 "
                f"{with_interval(report, 'f1')}  (baseline EM {report['baseline_scores']['exact_match']:.4f} F1 "
                f"{report['baseline_scores']['f1']:.4f}; n={report['n']:,} questions)"]

    def metrics_html(self, metrics: dict) -> str:
        return pages.metrics_table(metrics, ["exact_match", "f1", "loss"])

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        scored = metrics.get("test") or metrics.get("validation")
        if not scored:
            return []
        base = scored["baseline_scores"]
        sections = [f"<p>No-training baseline (the context sentence with the most words of the question) on the same "
                    f"questions: exact match {base['exact_match']:.4f}, F1 {base['f1']:.4f}; the model's F1 is "
                    f"{scored['vs_baseline']['f1']['delta']:+.4f} from it (paired 95% interval "
                    f"{scored['vs_baseline']['f1']['ci95'][0]:+.4f} to {scored['vs_baseline']['f1']['ci95'][1]:+.4f})."
                    f"</p>"]
        try:
            splits, _, _ = checked_questions(run.config())
        except AfinarError:
            return sections
        questions = {q.id: q for q in (splits.test if "test" in metrics else splits.validation) or []}
        rows = scored["rows"]
        items = "".join(f"<li>{html.escape(questions[qid].question)}<br>gold: "
                        f"{html.escape(' | '.join(dict.fromkeys(questions[qid].answers)))}<br>predicted: "
                        f"<mark>{html.escape(predicted)}</mark> (F1 {f1:.2f})</li>"
                        for qid, predicted, f1 in list(zip(rows["id"], rows["predicted"], rows["f1"]))[:EXAMPLES]
                        if qid in questions)
        if items:
            sections.append(f"<h2>Example questions</h2><ul>{items}</ul>")
        return sections

    def load_predictor(self, run: Run, backend: str = "auto"):
        from afinar.inference.spans import AnswerExtractor

        if backend not in ("auto", "torch"):
            raise AfinarError(f"backend {backend}: a {self.name} run predicts with torch only")
        return AnswerExtractor(run.model_dir, run.config().qa)

    def evaluate(self, run: Run, data: str | Path | None, backend: str, batch_size: int) -> dict:
        """Re-score the saved model on a SQuAD file, or on the run's own test split."""
        config = run.config()
        extractor = self.load_predictor(run, backend)
        if data is not None:
            questions = qa_data.read_questions_file(Path(data), DataArgs(encoding=config.data.encoding))
        else:
            splits, _, _ = checked_questions(config)
            if splits.test is None:
                raise NoTestSplit(f"the data of {run.path} has no test split; pass a SQuAD file with --data")
            questions = splits.test
        found = extractor.answers([q.question for q in questions], [q.context for q in questions])
        report = _without_rows(squad.answer_report([q.context[s:e] for q, (s, e, _) in zip(questions, found)],
                                                   [q.answers for q in questions], [q.id for q in questions]))
        report["baseline_scores"] = _without_rows(baseline_report(questions))
        report["data"] = str(data) if data is not None else "the run's test split"
        report["backend"] = extractor.backend
        return report
