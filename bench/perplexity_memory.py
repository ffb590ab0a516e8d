"""Peak memory of a perplexity measurement does not grow with the text: the full medical validation text against
a tenth of it, each measured in a fresh process (peak resident set size from the kernel).

    python bench/perplexity_memory.py [--model smollm2-135m] [--text ../shared/data/medical_abstracts/corpus_valid.txt]

Prints JSON and a markdown table and writes both to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_results

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_abstracts" / "corpus_valid.txt"


def measure(model: str, text_path: str, fraction: float, block_size: int, stride: int, batch_size: int) -> dict:
    """In this process: perplexity of the first `fraction` of the text's lines, and this process's peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.config import ModelArgs
    from afinar.core.models import resolve
    from afinar.evaluation.forgetting import perplexity_stats

    lines = Path(text_path).read_text(encoding="utf-8").splitlines()
    text = "\n".join(lines[: max(1, round(len(lines) * fraction))])
    path = resolve(ModelArgs(name=model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    stats = perplexity_stats(lm, tokenizer, text, block_size, stride, batch_size=batch_size)
    return {"fraction": fraction, "characters": len(text), **stats, "seconds": time.perf_counter() - started,
            "rss_after_load_mb": loaded, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = parser.parse_args()
    options = (args.block_size, args.stride, args.batch_size)
    if args.child is not None:
        print(json.dumps(measure(args.model, args.text, args.child, *options)))
        return
    rows = []
    for fraction in (0.1, 1.0):
        command = [sys.executable, __file__, "--model", args.model, "--text", args.text, "--child", str(fraction),
                   "--block-size", str(args.block_size), "--stride", str(args.stride),
                   "--batch-size", str(args.batch_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    result = {"model": args.model, "text": args.text, "block_size": args.block_size, "stride": args.stride,
              "rows": rows, "peak_rss_ratio_full_to_tenth": ratio}
    table = ["| text | tokens | perplexity | seconds | RSS after load (MB) | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['fraction']:.0%} | {r['tokens']:,} | {r['perplexity']:.2f} | {r['seconds']:.0f} | "
              f"{r['rss_after_load_mb']:,.0f} | {r['peak_rss_mb']:,.0f} |" for r in rows]
    table.append(f"\nPeak RSS, full text / a tenth: {ratio:.3f}")
    write_results("perplexity_memory", result, "\n".join(table))
    print(json.dumps(result, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
