"""GGUF export of a run that generates text, for llama.cpp and Ollama, checked by reading the file back.

    <run>/gguf/                (or --out DIR)
      model-f16.gguf           matrices f16, norms f32                       (`--dtype f16`, the default)
      model-q8_0.gguf          matrices q8_0 (blocks of 32, one f16 scale), norms f32   (`--dtype q8_0`)
      Modelfile                Ollama: FROM the file just written, its chat template as a Go template, the
                               trained system prompt, the stop token and afinar's sampling defaults
      export.json              per dtype: the file, its tensor types and the check below

What is written follows llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`: the run's model folder (LoRA
already merged when the run saved it) is read as safetensors; q_proj and k_proj are permuted per head into the
interleaved rotary layout llama.cpp uses (`permute`; transformers undoes it when it reads a GGUF); tensor names
come from gguf-py's map for `MODEL_ARCH.LLAMA`; 1-D tensors stay f32; a matrix whose rows do not split into
blocks of 32 is stored f16 under q8_0; a tied lm_head is not written (readers tie it again when `output.weight`
is missing). The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens, their types,
merges, special token ids, the chat template, and the pre-tokenizer name that llama.cpp recognises by hashing
the tokens of a fixed text (only byte-level BPE tokenizers whose hash is known here are written: SmolLM/SmolLM2,
Llama 3, GPT-2; a SentencePiece Llama tokenizer is refused).

The check: transformers loads the written file (`from_pretrained(folder, gguf_file=...)`, its own GGUF reader:
dequantize, un-permute, rebuild the tokenizer) and scores `CHECK_PROMPTS`, rendered as the run renders prompts,
beside the run's model. Compared over every position: the largest |logit difference| divided by the standard
deviation of the run's logits (scale-free, so one tolerance fits a random tiny model and a trained one), and
the share of positions whose top token is the same. The tokenizer rebuilt from the file must give the very ids
of the run's tokenizer and the chat template must come back unchanged. Tolerances, from measurements on a tiny
random Llama and on SmolLM2-135M-Instruct (see README): `TOLERANCE`. A file that misses is deleted.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from hashlib import sha256
from importlib.metadata import version
from pathlib import Path

import numpy as np

from afinar.core.config import ModelArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_causal_lm, load_tokenizer
from afinar.core.runs import Run, read_json, write_atomic, write_json
from afinar.inference.generation import (
    MAX_NEW_TOKENS,
    TEMPERATURE,
    TOP_P,
    GenerationFormat,
)

GGUF_DIR = "gguf"
DTYPES = ("f16", "q8_0")
MODELFILE = "Modelfile"
RECORD = "export.json"


@dataclass(frozen=True)
class Tolerance:
    """What the model read back from the file may differ by from the run's model, over all checked positions."""

    relative_logit_diff: float  # max |logit difference| / std of the run's logits
    top1_agreement: float  # share of positions whose most likely next token is the same


# Measured (relative diff, top-1 agreement) on 175 positions: f16 -- SmolLM2-135M-Instruct 0.0054, 100%; a tiny
# random Llama (init std 0.1) 0.0059, 99.4%. q8_0 -- SmolLM2 0.17, 96.6%; tiny 0.19, 93.7%; every flip at a
# near-tie (top-2 margin < 0.16). A wrong q/k layout (no permutation) gives 5.2, 49% on SmolLM2 and 5.8, 20% on the
# tiny model: the tolerances leave 3-5x room over what the dtype costs and 10x below a broken file.
TOLERANCE = {"f16": Tolerance(0.03, 0.98), "q8_0": Tolerance(0.5, 0.85)}

CHECK_PROMPTS = ("Give three tips for staying healthy.",
                 "Translate to French: The weather is lovely today, isn't it?",
                 "Write a haiku about autumn leaves, then explain its imagery in one sentence.",
                 "What is 17 * 23? Show your working step by step.")
CHECK_CONVERSATION = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                      {"role": "user", "content": "And a fruit?"}]
# tokenized plainly by both tokenizers: spaces, digits, accents, emoji, CJK, code
CHECK_TEXT = "  naïve café, 3.14159 and 1,000,000 🦙🦙 — ¿qué? 日本語\tdef f(x):\n    return x**2  # ok\n\n"

_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
           "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
           "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
           "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
# llama.cpp's `get_vocab_base_pre`: sha256 of the ids of `_CHKTXT` -> the pre-tokenizer name its loader implements
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def gguf_file_name(dtype: str) -> str:
    return f"model-{dtype}.gguf"


# ---------------------------------------------------------------- writing


def _llama_config(model_dir: Path):
    """The run model's config, or a one-line error when it is not a decoder llama.cpp reads as `llama`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    architecture = (config.architectures or [type(config).__name__])[0]
    if config.model_type != "llama" or architecture != "LlamaForCausalLM":
        raise AfinarError(f"GGUF export writes Llama-family decoders (LlamaForCausalLM, as SmolLM2); the model in "
                          f"{model_dir} is {architecture} ({config.model_type})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise AfinarError(f"GGUF export does not write rope scaling ({rope['rope_type']!r}) yet; the model in "
                          f"{model_dir} uses it")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise AfinarError(f"GGUF export writes Llama decoders without biases; the model in {model_dir} has "
                          f"attention or MLP biases")
    return config


def permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rotary halves (HF: [x0..x63 | y0..y63]) interleaved (GGUF:
    x0 y0 x1 y1 ...), the layout llama.cpp's rope kernel reads."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(name: str, array: np.ndarray, dtype: str):
    """As llama.cpp's converter: 1-D tensors and norms f32, matrices in `dtype`."""
    from gguf import GGMLQuantizationType as Q

    if array.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    return Q.Q8_0 if dtype == "q8_0" else Q.F16


def _add_tensors(writer, model_dir: Path, config, dtype: str) -> dict[str, int]:
    """Every tensor of the model under its GGUF name and type; returns how many tensors of each type."""
    import gguf
    import torch
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    counts: dict[str, int] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise AfinarError(f"{model_dir} has no safetensors weights to export")
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for hf_name in weights.keys():
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # tied to the embeddings: readers reuse token_embd when output.weight is missing
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise AfinarError(f"{file.name}: tensor {hf_name} has no GGUF name for a llama model")
                array = weights.get_tensor(hf_name).to(torch.float32).numpy()
                if hf_name.endswith("q_proj.weight"):
                    array = permute(array, n_head, n_head)
                elif hf_name.endswith("k_proj.weight"):
                    array = permute(array, n_head, n_kv)
                qtype = _tensor_type(name, array, dtype)
                try:
                    data = gguf.quants.quantize(array, qtype)
                except gguf.QuantError:  # rows not in whole blocks of 32: llama.cpp falls back to f16 too
                    qtype = gguf.GGMLQuantizationType.F16
                    data = gguf.quants.quantize(array, qtype)
                writer.add_tensor(name, data, raw_dtype=qtype)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def pre_tokenizer(tokenizer) -> str:
    """The name llama.cpp gives this tokenizer's pre-tokenizer, or a one-line error when it is not known here."""
    digest = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise AfinarError(f"GGUF export writes the byte-level BPE tokenizers whose pre-tokenizer llama.cpp knows "
                          f"({', '.join(PRE_TOKENIZERS.values())}); this one's (hash {digest[:12]}) is not among them")
    return PRE_TOKENIZERS[digest]


def _add_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int, add_bos: bool) -> None:
    """llama.cpp's `_set_vocab_gpt2`: tokens and types by id, merges, special ids, add-BOS and the chat template."""
    import gguf

    if getattr(tokenizer, "backend_tokenizer", None) is None or \
            tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise AfinarError(f"GGUF export writes byte-level BPE tokenizers; the tokenizer in {model_dir} is not one")
    pre = pre_tokenizer(tokenizer)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise AfinarError(f"the tokenizer in {model_dir} has ids up to {max(by_id)} but the model only "
                          f"{vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            special = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = {"bos": add_bos, "eos": False}  # as afinar renders prompts, not as guessed
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model_dir: Path, path: Path, dtype: str, prompt_format: GenerationFormat, name: str) -> dict[str, int]:
    """Write the Llama model in `model_dir` with its tokenizer to `path`; returns the tensor types' counts."""
    import gguf
    from transformers import AutoTokenizer

    config = _llama_config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if dtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # a plain prompt starts with BOS only where training put one; chat prompts get only what the template writes
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    _add_tokenizer(writer, model_dir, tokenizer, config.vocab_size,
                   adds_bos and prompt_format.bos and not prompt_format.chat)
    counts = _add_tensors(writer, model_dir, config, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


# ---------------------------------------------------------------- checking


def _prompts(tokenizer, prompt_format: GenerationFormat) -> list[list[int]]:
    return [prompt_format.prompt_ids(tokenizer, prompt) for prompt in CHECK_PROMPTS]


def _tokens(tokenizer, prompt_format: GenerationFormat) -> list[list[int]]:
    """Ids of `CHECK_TEXT` as plain text and, for a chat model, of `CHECK_CONVERSATION` through the template."""
    ids = [tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]]
    return ids + ([prompt_format.chat_ids(tokenizer, CHECK_CONVERSATION)] if prompt_format.chat else [])


def compare_logits(reference: list[np.ndarray], exported: list[np.ndarray]) -> dict:
    """Figures of the exported model's logits against the run's, over every position of every prompt."""
    ref, out = np.concatenate(reference).astype(np.float64), np.concatenate(exported).astype(np.float64)
    diff = float(np.abs(out - ref).max())
    scale = float(ref.std())
    log_p, log_q = (x - x.max(1, keepdims=True) for x in (ref, out))
    log_p, log_q = (x - np.log(np.exp(x).sum(1, keepdims=True)) for x in (log_p, log_q))
    return {"prompts": len(reference), "positions": len(ref), "max_abs_logit_diff": diff,
            "logit_std": scale, "relative_logit_diff": diff / scale if scale > 0 else float("inf"),
            "mean_kl": float((np.exp(log_p) * (log_p - log_q)).sum(1).mean()),  # nats per position, run || file
            "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "last_top1_agreement": float(np.mean([o[-1].argmax() == r[-1].argmax()
                                                  for o, r in zip(exported, reference)]))}


def _logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def check_gguf(model_dir: Path, path: Path, prompt_format: GenerationFormat, dtype: str) -> dict:
    """Read `path` back with transformers and compare it with the model and tokenizer in `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    args = ModelArgs(name=str(model_dir))
    tokenizer = load_tokenizer(args)
    prompts = _prompts(tokenizer, prompt_format)
    reference = _logits(load_causal_lm(args).eval(), prompts)
    read_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    exported = _logits(model, prompts)
    figures = compare_logits(reference, exported)
    figures["tokenizer_matches"] = (_prompts(read_back, prompt_format) == prompts
                                    and _tokens(read_back, prompt_format) == _tokens(tokenizer, prompt_format))
    figures["chat_template_matches"] = read_back.chat_template == tokenizer.chat_template
    figures["tolerance"] = vars(TOLERANCE[dtype])
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return figures


def check_failure(figures: dict, dtype: str) -> str | None:
    """What the check missed, or None when the file passes."""
    tolerance = TOLERANCE[dtype]
    if not figures["relative_logit_diff"] <= tolerance.relative_logit_diff:  # also catches NaN
        return (f"max |logit difference| {figures['max_abs_logit_diff']:.3g} is {figures['relative_logit_diff']:.3g} "
                f"of the logits' std (tolerance {tolerance.relative_logit_diff:g} for {dtype})")
    if figures["top1_agreement"] < tolerance.top1_agreement:
        return (f"the top token agrees at {figures['top1_agreement']:.1%} of {figures['positions']} positions "
                f"(tolerance {tolerance.top1_agreement:.0%} for {dtype})")
    if not figures["tokenizer_matches"]:
        return "the tokenizer read back from the file gives other token ids than the run's"
    if not figures["chat_template_matches"]:
        return "the chat template read back from the file differs from the run's"
    return None


# ---------------------------------------------------------------- Ollama


def _chatml(messages: list[dict[str, str]]) -> str:
    """What the Modelfile's Go template renders (with the generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")
PLAIN_TEMPLATE = "{{ .Prompt }}"


def ollama_chat(tokenizer, system: str | None) -> tuple[bool, str | None]:
    """(whether `CHATML_TEMPLATE` renders every conversation as the tokenizer's chat template does, the system
    prompt Ollama must add to conversations without one). Ollama puts the Modelfile's SYSTEM before conversations
    that do not open with a system message, as afinar does with the trained one; a template that adds a default
    system prompt of its own (SmolLM2's) gets that as SYSTEM when training set none."""
    from jinja2 import TemplateError

    from afinar.data import chat

    def jinja(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        chat.template_of(tokenizer)
        user = [{"role": "user", "content": "Hello there."}]
        alone = jinja(user)
    except (AfinarError, TemplateError, ValueError, TypeError):  # one that cannot render a chat is not ChatML
        return False, system
    if system is None and alone != _chatml(user):
        found = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", alone[:-len(_chatml(user))], re.DOTALL) \
            if alone.endswith(_chatml(user)) else None
        if found is None:
            return False, None
        system = found.group(1)
    prefix = [{"role": "system", "content": system}] if system else []
    conversations = [user, [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                            {"role": "user", "content": "and 3 + 3?"}]]
    same = all(jinja(prefix + c) == _chatml(prefix + c) for c in conversations)
    own = [{"role": "system", "content": "Be terse."}, *conversations[1]]
    return same and jinja(own) == _chatml(own), system


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise AfinarError(f'the {what} contains """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(file_name: str, template: str | None, system: str | None, stop: str | None, context: int) -> str:
    lines = [f"FROM ./{file_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template, 'chat template')}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    lines += [f"PARAMETER temperature {TEMPERATURE}", f"PARAMETER top_p {TOP_P}",
              f"PARAMETER num_predict {MAX_NEW_TOKENS}", f"PARAMETER num_ctx {min(context, 4096)}"]
    return "\n".join(lines) + "\n"


def _ollama(model_dir: Path, prompt_format: GenerationFormat, file_name: str) -> tuple[str, dict]:
    """The Modelfile's text and what the record says of it."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop = prompt_format.eos_token or tokenizer.eos_token
    context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    if not prompt_format.chat:
        text = modelfile(file_name, PLAIN_TEMPLATE, None, stop, context)
        return text, {"template": "plain continuation ({{ .Prompt }})", "system": None, "stop": stop}
    chatml, system = ollama_chat(tokenizer, prompt_format.system)
    text = modelfile(file_name, CHATML_TEMPLATE if chatml else None, system, stop, context)
    note = "ChatML, as a Go template" if chatml else \
        "not ChatML: no TEMPLATE in the Modelfile, so Ollama uses the chat template embedded in the GGUF"
    record = {"template": note, "system": system, "stop": stop}
    if prompt_format.template:
        record["prompt_template"] = (f"training wrapped each prompt in sft.template {prompt_format.template!r}; "
                                     f"Ollama sends prompts as written, so wrap them the same way")
    return text, record


# ---------------------------------------------------------------- the export


def export_gguf(run: Run, prompt_format: GenerationFormat, dtype: str = "f16", out: str | Path | None = None) -> dict:
    """Write the run's model as GGUF in `dtype`, check it against the run's model (an AfinarError, and no file
    left, when it misses), write the Ollama Modelfile and record both in `export.json`; returns the record."""
    if dtype not in DTYPES:
        raise AfinarError(f"GGUF dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    run.require_finished()
    out_dir = Path(out) if out is not None else run.path / GGUF_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / gguf_file_name(dtype)
    started = time.perf_counter()
    try:
        types = write_gguf(run.model_dir, path, dtype, prompt_format, run.path.name)
        seconds = time.perf_counter() - started
        figures = check_gguf(run.model_dir, path, prompt_format, dtype)
        missed = check_failure(figures, dtype)
        if missed is not None:
            raise AfinarError(f"GGUF export of {run.path} ({dtype}) does not match the run's model: {missed} on "
                              f"{len(CHECK_PROMPTS)} prompts; nothing was exported")
        text, ollama = _ollama(run.model_dir, prompt_format, path.name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    write_atomic(out_dir / MODELFILE, text)
    earlier = read_json(out_dir / RECORD).get("exports", {}) if (out_dir / RECORD).is_file() else {}
    exports = {d: e for d, e in earlier.items() if d != dtype and (out_dir / e["file"]).is_file()}
    exports[dtype] = {"file": path.name, "megabytes": round(path.stat().st_size / 2**20, 1),
                      "seconds_to_write": round(seconds, 2), "tensor_types": types, "check": figures,
                      "time": time.time()}
    record = {"run": str(run.path.resolve()), "model_dir": str(run.model_dir.resolve()), "format": "gguf",
              "folder": str(out_dir), "architecture": "llama", "dtype": dtype, "file": path.name,
              "modelfile": MODELFILE, "ollama": ollama, "check_prompts": list(CHECK_PROMPTS), "exports": exports,
              "versions": {name: version(name) for name in ("gguf", "transformers", "torch")}}
    write_json(out_dir / RECORD, record)
    return record


def export_lines(record: dict) -> list[str]:
    """What `afinar export --format gguf` prints: the file, the check, and how to run it."""
    folder, dtype = Path(record["folder"]), record["dtype"]
    entry, ollama = record["exports"][dtype], record["ollama"]
    check, path = entry["check"], folder / entry["file"]
    types = ", ".join(f"{n} {name}" for name, n in sorted(entry["tensor_types"].items()))
    system = f"; system prompt {ollama['system'][:60]!r}" if ollama.get("system") else ""
    lines = [
        (f"gguf {dtype}: {path} ({entry['megabytes']:,.1f} MB; tensors {types}; written in "
         f"{entry['seconds_to_write']:.1f} s)"),
        (f"check (transformers reading the file, {check['prompts']} prompts, {check['positions']} positions, "
         f"{check['seconds']:.1f} s): max |logit diff| {check['max_abs_logit_diff']:.2e} = "
         f"{check['relative_logit_diff']:.4f} of the logits' std (tolerance "
         f"{check['tolerance']['relative_logit_diff']:g}), mean KL {check['mean_kl']:.1e} nats; top token agrees at "
         f"{check['top1_agreement']:.1%} of positions, {check['last_top1_agreement']:.0%} of last positions; "
         f"tokenizer and chat template identical"),
        (f"ollama: ollama create NAME -f {folder / record['modelfile']} && ollama run NAME  (template: "
         f"{ollama['template']}; stop {ollama['stop']!r}{system})"),
        (f"llama.cpp: llama-cli -m {path} -cnv  (the embedded chat template; -sys for the system prompt; "
         f"llama-server -m ... serves an OpenAI-compatible API)"),
    ]
    return lines + ([f"note: {ollama['prompt_template']}"] if ollama.get("prompt_template") else [])
