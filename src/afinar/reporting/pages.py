"""Self-contained HTML reports: one file each, plots embedded as base64 PNG (matplotlib, Agg), nothing fetched.

    write_run_report(run_dir, ...)  <run>/report.html: the task's metrics and sections (`tasks.base.Task`),
                                    learning curves, the data checks, and a written diagnosis of the curves
    write_comparison_report(folder) <folder>/report.html for `compare`: the table, accuracy and cost plots, the
                                    recommendation, the data checks, links to each fine-tuning run's report
    write_search_report(folder)     <folder>/report.html for `search`: trials, history and importance plots, the
                                    single test score, the best run's diagnosis
    write_curve_report(folder)      <folder>/report.html for `curve`: accuracy against training rows, the gain
                                    from doubling, the full size predicted beside the measured one
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from afinar.core.errors import AfinarError
from afinar.core.runs import Run, read_json, write_atomic
from afinar.evaluation.diagnosis import METRIC_NAMES, Baseline, baseline_of, diagnose
from afinar.evaluation.metrics import with_interval

COLUMNS = ["strategy", "model", "val acc", "test acc [95% CI]", "vs best, paired [95% CI]", "test macro-F1",
           "train time", "inference texts/s", "peak memory", "trainable params"]  # the comparison table
PAIRED_LEGEND = ("vs best: test accuracy points above the strategy with the best validation accuracy, on the same "
                 "test rows, with a 95% paired bootstrap interval (* = the interval excludes 0: beyond noise).")

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td{white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
td.text,th.text{text-align:left;white-space:normal;overflow-wrap:anywhere;min-width:12em}
.verdict{font-size:1.2em;font-weight:600}.muted{color:#666}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}"""


# ---------------------------------------------------------------- plots


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return _data_uri(buffer.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(width: float, height: float, columns: int = 1):
    """A bare matplotlib `Figure`, rendered by the Agg canvas: no pyplot, so no display, no global state and no
    change to the backend of a notebook that imports afinar."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns)


def plot_confusion(report: dict, title: str) -> str:
    matrix, labels = report["confusion_matrix"], report["labels"]
    fig, ax = _figure(0.9 * len(labels) + 2.4, 0.8 * len(labels) + 1.8)
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, f"{count:,}", ha="center", va="center", fontsize=8,
                    color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def plot_learning_curves(log_history: list[dict], baseline: Baseline | None) -> str:
    fig, (loss_ax, acc_ax) = _figure(8, 2.8, columns=2)
    train = [(r["step"], r["loss"]) for r in log_history if r.get("loss") is not None and r.get("eval_loss") is None]
    evals = [r for r in log_history if r.get("eval_loss") is not None]
    if train:
        loss_ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, label="validation loss")
    metric = baseline.metric if baseline else "accuracy"
    said = f"validation {METRIC_NAMES.get(metric, metric)}"
    score = [(r["step"], r[f"eval_{metric}"]) for r in evals if r.get(f"eval_{metric}") is not None]
    if score:
        acc_ax.plot(*zip(*score), "o-", ms=3, color="C2", label=said)
    if baseline is not None:
        acc_ax.axhline(baseline.value, color="gray", ls="--", lw=1, label=baseline.name)
    for ax, title in ((loss_ax, "loss"), (acc_ax, said)):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def plot_per_class(report: dict, title: str) -> str:
    names = list(report["per_class"])
    fig, ax = _figure(max(4.0, 1.2 * len(names) + 1.5), 2.8)
    width = 0.27
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar([i + (k - 1) * width for i in range(len(names))], [report["per_class"][n][metric] for n in names],
               width, label=metric)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, fontsize=8)
    ax.set_ylim(0, 1.18)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    return _png(fig)


def plot_comparison_accuracy(rows: list[dict], majority: float | None) -> str:
    fig, ax = _figure(max(4.5, 0.9 * len(rows) + 2), 3)
    names = [r["name"] for r in rows]
    for offset, split, color in ((-0.2, "validation", "C0"), (0.2, "test", "C1")):
        ax.bar([i + offset for i in range(len(rows))], [(r[split] or {}).get("accuracy", 0) for r in rows], 0.4,
               label=split, color=color)
        raw = [(i + offset, r["variants"]["raw"][split]) for i, r in enumerate(rows)
               if split in r.get("variants", {}).get("raw", {})]
        if raw:
            ax.scatter(*zip(*raw), marker="_", s=200, color="black", zorder=3, label=f"{split}, raw prompt scores")
    if majority is not None:
        ax.axhline(majority, color="gray", ls="--", lw=1, label="majority class (test)")
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_comparison_cost(rows: list[dict]) -> str:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (speed_ax, train_ax) = _figure(8, 3, columns=2)
    for i, r in enumerate(rows):
        accuracy = (r["test"] or r["validation"] or {}).get("accuracy")
        if accuracy is None:
            continue
        for ax, x in ((speed_ax, r["infer_texts_per_s"]), (train_ax, max(r["train_seconds"], 0.1))):
            if x:
                ax.scatter(x, accuracy, s=20 + (r["peak_memory_mb"] or 0) / 20, alpha=0.7, color=f"C{i % 10}",
                           label=r["name"] if ax is train_ax else None)
    for ax, label in ((speed_ax, "prediction texts/s (log)"), (train_ax, "fit seconds (log)")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=8)
    speed_ax.set_title("accuracy vs prediction speed (size: peak memory)", fontsize=9)
    train_ax.set_title("accuracy vs fit time", fontsize=9)
    train_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=0.6)
    return _png(fig)


def plot_learning_curve(curve: dict) -> str:
    """Validation accuracy against training rows (log2 axis), the two fitted lines and the full-size test score."""
    points = curve["points"]
    fig, ax = _figure(6, 3.4)
    rows = [p["rows"] for p in points]
    ax.plot(rows, [p["validation"]["accuracy"] for p in points], "o-", color="C0", label="validation accuracy")
    for key, color, label in (("extrapolation", "C1", "fit below full size (predicts it)"),
                              ("gain_from_doubling", "C2", "fit through the largest points")):
        fit = curve.get(key)
        if fit:
            xs = [min(fit["rows"]), rows[-1]]
            ax.plot(xs, [fit["intercept"] + fit["slope"] * math.log2(x) for x in xs], "--", color=color, label=label)
    tested = [(p["rows"], p["test"]["accuracy"]) for p in points if p.get("test")]
    if tested:
        ax.scatter(*zip(*tested), marker="*", s=120, color="C3", zorder=3, label="test (full size, read once)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows, [f"{r:,}" for r in rows], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------- HTML


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], text_columns: tuple[int, ...] = ()) -> str:
    """An HTML table; figures align right and stay on one line, the `text_columns` (free text: tweets, prompts)
    align left and wrap, so a long text never pushes the figures off the page."""
    def cell(tag: str, index: int, value) -> str:
        return f"<{tag} class='text'>{_e(value)}</{tag}>" if index in text_columns else f"<{tag}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"></figure>'


def _page(title: str, sections: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")


def data_report_html(report: dict | None) -> str:
    """The data checks' headline counts per split, leakage and the actions taken."""
    if not report:
        return "<h2>Data checks</h2><p class='muted'>No data report in this folder.</p>"
    splits = list(report.get("rows", {}))

    def count(key: str):
        return [(report.get(key, {}).get(s) or {}).get("count", "") for s in splits]

    rows = [["rows", *[f"{report['rows'][s]:,}" for s in splits]], ["empty", *count("empty")],
            ["mojibake / control characters", *count("mojibake")], ["duplicates (normalised)", *count("duplicates")],
            ["conflicting labels (texts)", *[(report.get("conflicts") or {}).get("count", "") if s == "train" else ""
                                              for s in splits]],
            ["majority-class baseline", *[f"{b:.1%}" if (b := (report.get("balance", {}).get(s) or {})
                                                            .get("baseline")) is not None else "" for s in splits]]]
    if report.get("lengths"):
        rows.append(["tokens p50 / p95 / max", *["{p50} / {p95} / {max}".format(**report["lengths"][s])
                                                  if report["lengths"].get(s) else "" for s in splits]])
    leaks = [[pair, kinds.get("exact", {}).get("count", 0), kinds.get("near", {}).get("count", 0)]
             for pair, kinds in report.get("leakage", {}).items()]
    actions = "".join(f"<li>{_e(a.get('note', a))}</li>" for a in report.get("actions", []))
    return ("<h2>Data checks</h2>" + _table(["", *splits], rows)
            + (_table(["overlap (later split rows found in the earlier)", "exact",
                       f"near (Jaccard ≥ {report.get('threshold', '')})"], leaks) if leaks else "")
            + (f"<p>Actions before training:</p><ul>{actions}</ul>" if actions else ""))


def metrics_table(metrics: dict, keys: list[str]) -> str:
    """Validation and test figures: each of `keys` (with its 95% interval when the split has one), n."""
    scored = {split: m for split in ("validation", "test") if (m := metrics.get(split))}
    header = {"accuracy": "accuracy", "macro_f1": "macro-F1", "micro_f1": "micro-F1", "loss": "loss",
              "perplexity": "perplexity", "majority_baseline": "majority baseline"}
    intervals = any(m.get("ci95") for m in scored.values())
    return _table(["split", *[header.get(k, k) + (" [95% CI]" if intervals and k in ("accuracy", "macro_f1") else "")
                              for k in keys], "n"],
                  [[split, *[_figure_text(m, k) for k in keys], f"{m['n']:,}" if "n" in m else ""]
                   for split, m in scored.items()])


def _figure_text(scores: dict, key: str) -> str:
    if scores.get(key) is None:
        return ""
    if (scores.get("ci95") or {}).get(key):
        return with_interval(scores, key)
    return f"{scores[key]:.2f}" if key == "perplexity" else f"{scores[key]:.4f}"


def training_paragraph(metrics: dict) -> str:
    train = metrics.get("train") or {}
    if not train:
        return ""
    return (f"<p>Training: {train.get('seconds', 0):.0f} s, {train.get('steps', 0):,} steps, "
            f"{train.get('samples_per_second') or 0:.1f} samples/s, "
            f"{train.get('trainable_parameters', 0):,} of {train.get('total_parameters', 0):,} parameters "
            f"trainable.</p>")


def forgetting_html(metrics: dict) -> str:
    """Perplexity of the base and the tuned model on domain and general text, and the verdict."""
    forgetting = metrics.get("forgetting")
    if not forgetting:
        return ""
    return (_table(["perplexity", "base model", "tuned model", "ratio"],
                   [[f"{name} text", f"{forgetting[name]['base_perplexity']:.2f}",
                     f"{forgetting[name]['tuned_perplexity']:.2f}", f"{forgetting[name]['ratio']:.3f}"]
                    for name in ("domain", "general")])
            + f"<p class='verdict'>{'Forgetting' if forgetting['forgetting'] else 'No forgetting'}: general "
              f"perplexity x{forgetting['general']['ratio']:.3f} (threshold x{forgetting['forgetting_ratio']:.2f}).</p>")


def held_out_split(metrics: dict) -> tuple[str, dict | None]:
    """The split a report's per-class figures show: test when there is one, else validation."""
    return ("test", metrics["test"]) if metrics.get("test") else ("validation", metrics.get("validation"))


def confusion_sections(metrics: dict) -> list[str]:
    """A confusion matrix and per-class precision/recall/F1 of the held-out split."""
    split, scored = held_out_split(metrics)
    if not scored or "confusion_matrix" not in scored:
        return []
    return [f"<h2>Errors and per-class scores ({split})</h2>",
            _img(plot_confusion(scored, f"confusion matrix ({split})"), "confusion matrix"),
            _img(plot_per_class(scored, f"per-class scores ({split})"), "per-class scores")]


def per_label_sections(metrics: dict) -> list[str]:
    """Multi-label: per-label counts and scores instead of a confusion matrix."""
    split, scored = held_out_split(metrics)
    if not scored or "per_class" not in scored:
        return []
    return [f"<h2>Per-label scores ({split}, thresholds tuned on validation)</h2>",
            _table(["label", "precision", "recall", "F1", "support"],
                   [[name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", f"{s['support']:,}"]
                    for name, s in scored["per_class"].items()]),
            _img(plot_per_class(scored, f"per-label scores ({split})"), "per-label scores")]


def generations_sections(metrics: dict, examples: list[str] | None) -> list[str]:
    """Greedy generations on validation prompts, and what the loss sees of two training conversations."""
    sections = []
    if metrics.get("generations"):
        sections += ["<h2>Sample generations (validation prompts, greedy)</h2>",
                     _table(["prompt", "expected", "generated"],
                            [[g["prompt"][:300], g["expected"][:300], g["generated"][:300]]
                             for g in metrics["generations"]], text_columns=(0, 1, 2))]
    if examples:
        sections += ["<h2>What the loss sees</h2><p class='muted'>Two training conversations as the model reads "
                     "them; only the tokens between [[ and ]] are trained.</p>",
                     *[f"<pre>{_e(example)}</pre>" for example in examples]]
    return sections


def write_run_report(run_dir: str | Path, metrics_html: str, sections: list[str]) -> Path:
    """`<run>/report.html`: the task's metrics table (`metrics_html`), the training figures, the diagnosis of
    the curves, the learning curves, the task's own `sections`, and the data checks."""
    run = Run.open(run_dir)
    metrics = run.metrics()
    if not metrics:
        raise AfinarError(f"{run.path} has no metrics.json yet (status: {run.status()}); report a finished run")
    history = run.read_log()
    baseline = baseline_of(metrics.get("validation"))
    diagnosis = diagnose(history, baseline)
    data_report = read_json(run.path / "data_report.json") if (run.path / "data_report.json").is_file() else None
    page = [f"<p class='muted'>{_e(run.path)} — status {_e(run.status())}</p>", "<h2>Metrics</h2>",
            metrics_html, training_paragraph(metrics),
            "<h2>Diagnosis</h2>", f"<p class='verdict'>{_e(diagnosis.verdict)}</p>",
            "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in diagnosis.reasons) + "</ul>",
            "<h2>Learning curves</h2>", _img(plot_learning_curves(history, baseline), "learning curves"),
            *sections, data_report_html(data_report)]
    path = run.path / "report.html"
    write_atomic(path, _page(f"afinar run {run.path.name}", page))
    return path


def suspects_html(run_dir: Path, summary: dict, shown: int = 15) -> str:
    """The training rows the trained model disagrees with most, from the run's suspects CSV."""
    from afinar.evaluation.suspects import read_suspects

    rows = read_suspects(run_dir / summary["file"], shown)
    pairs = bool(rows) and "text_pair" in rows[0]
    return (f"<h2>Suspect labels</h2><p>The trained model disagrees with the given label of "
            f"{summary['disagree']:,} of {summary['scored']:,} training rows; these are the ones with the least "
            f"probable given label (<code>{_e(summary['file'])}</code> ranks every row that way, unsure agreements "
            f"included, with its row in the source file): check them before "
            f"collecting more data. The model saw these rows in training, so a wrong label it has memorised ranks "
            f"lower here than in <code>afinar check --suspects</code>, whose model never sees the row it scores.</p>"
            + _table(["row", "text", *(["second text"] if pairs else []), "given", "model says", "confidence"],
                     [[r["row"], r["text"][:200], *([r["text_pair"][:200]] if pairs else []), r["given_label"],
                       r["suggested_label"], r["confidence"]] for r in rows], text_columns=(1, 2) if pairs else (1,)))


def _folder_record(folder: Path, name: str, command: str) -> dict:
    """The JSON record a command wrote into its folder, or a one-line error saying which command writes it."""
    if not (folder / name).is_file():
        raise AfinarError(f"{folder} holds no {name}; run `afinar {command}` first")
    return read_json(folder / name)


def write_comparison_report(folder: str | Path) -> Path:
    """`<folder>/report.html` from the comparison.json (and data_report.json) that `compare` wrote."""
    folder = Path(folder)
    comparison = _folder_record(folder, "comparison.json", "compare")
    rows = [r for r in comparison["results"] if not r.get("error")]
    majority = comparison.get("majority_baseline", {}).get("test")
    runs = []
    for r in rows:  # lora and full: link each run's own report (written when the run finished)
        run_dir = r.get("details", {}).get("run_dir")
        report = Path(run_dir) / "report.html" if run_dir else None
        if report is not None and report.is_file():
            verdict = diagnose(Run(Path(run_dir)).read_log(), baseline_of(r["validation"])).verdict
            link = report.relative_to(folder) if report.is_relative_to(folder) else report
            runs.append(f"<li><a href='{_e(link)}'>{_e(r['name'])}</a>: {_e(verdict)}</li>")
    sections = ["<h2>Recommendation</h2>", f"<p>{_markdown_bold(comparison['recommendation'])}</p>",
                "<h2>Results</h2>", _table(COLUMNS, comparison_rows(comparison["results"]), text_columns=(1,)),
                f"<p class='muted'>{_e(', '.join(f'{n:,} {split}' for split, n in comparison['rows'].items()))} "
                f"rows: the same splits and seed for every strategy. {_e(PAIRED_LEGEND)} Peak memory: "
                f"{_e(comparison['memory'])}. "
                f"Prompting rows show calibrated accuracy, raw in brackets.</p>"]
    warnings = [f"<li>{_e(r['name'])}: {_e(r['details']['warning'])}</li>" for r in rows
                if r.get("details", {}).get("warning")]
    if warnings:
        sections.append("<p>Warnings:</p><ul>" + "".join(warnings) + "</ul>")
    if rows:
        sections += [_img(plot_comparison_accuracy(rows, majority), "accuracy per strategy"),
                     _img(plot_comparison_cost(rows), "accuracy against cost")]
    if runs:
        sections += ["<h2>Fine-tuning runs</h2><ul>" + "".join(runs) + "</ul>"]
    data_report = folder / "data_report.json"
    sections.append(data_report_html(read_json(data_report) if data_report.is_file() else None))
    path = folder / "report.html"
    write_atomic(path, _page("afinar strategy comparison", sections))
    return path


def curve_findings(curve: dict) -> list[str]:
    """The curve's answer in sentences: the gain from doubling and how well the smaller points predicted the
    full size."""
    lines = []
    gain = curve.get("gain_from_doubling")
    if gain:
        interval = gain.get("slope_ci95")
        lines.append(f"Doubling the labelled data is expected to add {100 * gain['slope']:+.1f} points of validation "
                     f"accuracy" + (f" (95% interval {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}, from "
                                    f"resampled validation rows; one seed)" if interval else "")
                     + f": the slope of accuracy on log2 rows through {', '.join(f'{r:,}' for r in gain['rows'])} "
                     "rows.")
    if curve.get("predicted_full") is not None and curve.get("measured_full") is not None:
        error = 100 * (curve["predicted_full"] - curve["measured_full"])
        fit, interval = curve["extrapolation"], curve.get("predicted_full_ci95")
        lines.append(f"The line through {', '.join(f'{r:,}' for r in fit['rows'])} rows predicted "
                     f"{curve['predicted_full']:.3f} at the full size"
                     + (f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
                     + f"; it measured {curve['measured_full']:.3f} ({error:+.1f} points): how far a prediction "
                     f"across {math.log2(curve['rows']['train'] / fit['rows'][-1]):.1f} doublings can be trusted.")
    elif curve.get("no_prediction"):
        lines.append(f"No prediction of the full size: {curve['no_prediction']}.")
    test = next((p["test"] for p in curve["points"] if p.get("test")), None)
    if test:
        lines.append(f"Test (read once, full size): accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}.")
    return lines


def write_curve_report(folder: str | Path) -> Path:
    """`<folder>/report.html` for `curve`: the points, the fitted lines and what they predict."""
    folder = Path(folder)
    curve = _folder_record(folder, "curve.json", "curve")
    rows = [[f"{p['rows']:,}", f"{p['validation']['accuracy']:.4f}", f"{p['validation']['macro_f1']:.4f}",
             "—" if not p.get("test") else f"{p['test']['accuracy']:.4f}", f"{p['train_seconds']:,.0f} s"]
            for p in curve["points"]]
    sections = [f"<p>Strategy <b>{_e(curve['strategy'])}</b> on nested, seeded subsets of the training split; the "
                f"same {curve['rows'].get('validation', 0):,} validation rows score every point.</p>",
                "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in curve_findings(curve)) + "</ul>",
                _img(plot_learning_curve(curve), "learning curve"),
                _table(["training rows", "val accuracy", "val macro-F1", "test accuracy", "fit time"], rows)]
    data_report = folder / "data_report.json"
    sections.append(data_report_html(read_json(data_report) if data_report.is_file() else None))
    path = folder / "report.html"
    write_atomic(path, _page("afinar learning curve: how much data do I need?", sections))
    return path


def write_search_report(folder: str | Path) -> Path:
    """`<folder>/report.html` for `search`: the trials, the optimisation history and parameter importance, the
    single test score and the best run's diagnosis, with a link to that run's own report."""
    folder = Path(folder)
    result = _folder_record(folder, "search.json", "search")
    keys = list(result["best_params"])
    rows = [[f"{r['trial']}" + (" (as configured)" if r.get("baseline") else ""), r["state"],
             "" if r["value"] is None else f"{r['value']:.4f}",
             *[f"{v:.3g}" if isinstance(v := r.get(k, ""), float) else v for k in keys],
             "" if r.get("seconds") is None else f"{r['seconds']:.0f}"] for r in result["trials"]]
    test = result.get("test")
    diagnosis = result.get("diagnosis") or {}
    best_run = Path(result["best_run"])
    report = best_run / "report.html"
    link = report.relative_to(folder) if report.is_relative_to(folder) else report
    sections = [f"<p>Objective: validation {_e(result['metric'])}, best {result['best_validation']:.4f} "
                f"(trial {result['best_trial']}, <a href='{_e(link)}'>its run report</a>). The test split was read "
                "once, for that trial: " + (f"accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}."
                                            if test else "there is no test split.") + "</p>",
                "<h2>Diagnosis of the best run</h2>", f"<p class='verdict'>{_e(diagnosis.get('verdict', ''))}</p>",
                "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in diagnosis.get("reasons", [])) + "</ul>",
                "<h2>Trials</h2>", _table(["trial", "state", "validation", *keys, "seconds"], rows)]
    sections += [_img(_data_uri((folder / name).read_bytes()), name.removesuffix(".png"))
                 for name in result.get("plots", [])]
    path = folder / "report.html"
    write_atomic(path, _page("afinar hyperparameter search", sections))
    return path


def _paired_cell(result: dict) -> str:
    """`+1.2 [-0.3, +2.7]`: test accuracy points above the validation-best strategy, paired on the same rows;
    `best` on that strategy's own row."""
    paired = result.get("details", {}).get("paired_vs_best")
    if paired is None:
        return "—"
    if "accuracy" not in paired:
        return "best"
    gap = paired["accuracy"]
    return (f"{100 * gap['delta']:+.1f} [{100 * gap['ci95'][0]:+.1f}, {100 * gap['ci95'][1]:+.1f}]"
            + ("" if gap["within_noise"] else " *"))


def comparison_rows(results: list[dict]) -> list[list[str]]:
    """The comparison table's cells (for comparison.md and report.html), from results as comparison.json holds
    them; prompting rows show the raw accuracy beside the calibrated one."""
    rows = []
    for r in results:
        if r.get("error"):
            first = next((line for line in r["error"].splitlines() if line.strip()), "")
            rows.append([r["name"], r.get("model") or "", f"failed: {first[:100]}", *[""] * (len(COLUMNS) - 3)])
            continue
        raw = r.get("variants", {}).get("raw", {})

        def accuracy(split: str) -> str:
            scored = r.get(split) or {}
            if scored.get("accuracy") is None:
                return "—"
            shown = with_interval(scored, "accuracy", 3) if split == "test" else f"{scored['accuracy']:.3f}"
            return shown + (f" (raw {raw[split]:.3f})" if split in raw else "")

        f1 = (r.get("test") or {}).get("macro_f1")
        rows.append([r["name"], r["model"], accuracy("validation"), accuracy("test"), _paired_cell(r),
                     "—" if f1 is None else f"{f1:.3f}", f"{r['train_seconds']:,.1f} s",
                     f"{r['infer_texts_per_s']:,.1f}" if r.get("infer_texts_per_s") else "—",
                     f"{r['peak_memory_mb']:,.0f} MB" if r.get("peak_memory_mb") else "—",
                     f"{r['trainable_params']:,}"])
    return rows


def _markdown_bold(text: str) -> str:
    parts = _e(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
