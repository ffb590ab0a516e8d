"""GGUF export of a tiny sft run (LoRA merged): transformers reads the file back with the run's logits, token ids
and chat template, in f16 and q8_0; the Modelfile carries the template and the trained system prompt; a run that
does not generate, a model that is not a Llama and --int8 with gguf are one-line errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, make_run
from transformers import AutoTokenizer

import afinar
from afinar import cli
from afinar.core.assets import model_path
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.inference import gguf_export
from afinar.inference.generation import GenerationFormat

SYSTEM = "You are a terse assistant. Answer in one sentence."


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, one_thread) -> Path:
    """A finished sft run, with LoRA merged on save, of a 2-layer Llama with SmolLM2's tokenizer and template
    (grouped-query attention: q and k are permuted with different head counts), trained with a system prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=True,  # sharp attention: a wrong q/k layout shows
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    data = folder / "seed.jsonl"
    lines = (SHARED / "self_instruct_seed" / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines(True)
    data.write_text("".join(lines[:40]), encoding="utf-8")
    sets = {"task": "sft", "model": folder / "model", "data.source": data, "train.output_dir": folder,
            "train.run_name": "r", "train.max_steps": 4, "train.batch_size": 8, "train.learning_rate": 3e-3,
            "train.eval_every": 4, "train.early_stopping_patience": None, "data.max_length": 128,
            "lm.max_eval_tokens": 64, "lm.block_size": 64, "lm.stride": 64, "sft.validity_samples": 2,
            "sft.generation_samples": 1, "sft.max_new_tokens": 4, "sft.system": SYSTEM}
    return afinar.train(load_config(overrides=[f"{k}={v}" for k, v in sets.items()])).run_dir


@pytest.fixture(scope="module")
def f16(sft_run, one_thread):
    """`afinar export RUN --format gguf` (f16 by default): its exit status and printed lines."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(["export", str(sft_run), "--format", "gguf"])
    return status, printed.getvalue()


def read_gguf(path: Path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()
                    if not name.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                            "tokenizer.ggml.merges"))}


def test_f16_reads_back_with_the_runs_logits_tokens_and_template(sft_run, f16):
    status, printed = f16
    assert status == 0
    folder = sft_run / "gguf"
    record = json.loads((folder / "export.json").read_text())
    check = record["exports"]["f16"]["check"]
    assert check["relative_logit_diff"] <= gguf_export.TOLERANCE["f16"].relative_logit_diff
    assert check["top1_agreement"] == 1.0 and check["chat_template_matches"]
    # the tokenizer transformers rebuilds from the file gives the run's ids: the check prompts (system prompt and
    # chat template), a multi-turn conversation, and text of spaces, digits, accents, emoji, CJK and code
    assert check["tokenizer_matches"]
    assert record["exports"]["f16"]["tensor_types"] == {"F16": 15, "F32": 5}  # 2 x 7 matrices + embeddings; norms
    assert f"{folder / 'model-f16.gguf'}" in printed and "ollama create NAME -f" in printed
    reader, fields = read_gguf(folder / "model-f16.gguf")
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False  # chat prompts get only what the template writes
    run_tokenizer = AutoTokenizer.from_pretrained(sft_run / "model")
    assert fields["tokenizer.chat_template"] == run_tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied to the embeddings, as in SmolLM2
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert GenerationFormat.load(sft_run / "model", chat=True).system == SYSTEM


@pytest.mark.slow  # 16 s: the f16 round trip above is the suite's; q8_0 on real SmolLM2 weights is slow's too
def test_q8_0_reads_back_within_its_tolerance_beside_the_f16_file(sft_run, f16):
    record = afinar.export(sft_run, format="gguf", dtype="q8_0")
    entry = record["exports"]["q8_0"]
    assert entry["check"]["relative_logit_diff"] <= gguf_export.TOLERANCE["q8_0"].relative_logit_diff
    assert entry["check"]["top1_agreement"] >= gguf_export.TOLERANCE["q8_0"].top1_agreement
    assert entry["tensor_types"] == {"Q8_0": 15, "F32": 5}
    assert set(record["exports"]) == {"f16", "q8_0"}  # the f16 export is still described
    folder = sft_run / "gguf"
    assert (folder / "model-q8_0.gguf").stat().st_size < 0.7 * (folder / "model-f16.gguf").stat().st_size
    assert (folder / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")


def test_the_modelfile_carries_the_chatml_template_and_the_trained_system_prompt(sft_run, f16):
    text = (sft_run / "gguf" / "Modelfile").read_text()
    assert f'TEMPLATE """{gguf_export.CHATML_TEMPLATE}"""' in text
    assert f'SYSTEM """{SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0.8" in text and "PARAMETER num_ctx 256" in text
    # a causal_lm run continues plain text: the prompt as it is, no system prompt
    text, record = gguf_export._ollama(sft_run / "model", GenerationFormat(), "model-f16.gguf")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "SYSTEM" not in text and record["system"] is None


def test_the_go_template_is_written_only_for_a_chat_template_it_renders_alike():
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    # SmolLM2's template adds its own system prompt when training set none: the Modelfile's SYSTEM says it
    chatml, system = gguf_export.ollama_chat(tokenizer, None)
    assert chatml and system.startswith("You are a helpful AI assistant named SmolLM")
    assert gguf_export.ollama_chat(tokenizer, SYSTEM) == (True, SYSTEM)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    assert gguf_export.ollama_chat(tokenizer, SYSTEM) == (False, SYSTEM)
    text = gguf_export.modelfile("model-f16.gguf", None, SYSTEM, "<|im_end|>", 8192)
    assert "TEMPLATE" not in text and "PARAMETER num_ctx 4096" in text  # Ollama uses the GGUF's own template


def test_the_q_and_k_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)  # 6 heads of 16 rows
    permuted = gguf_export.permute(weights, 6, 2)  # k of 6 query heads sharing 2 kv heads of 48 rows
    assert not np.array_equal(permuted, weights)
    undone = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": 2}).process(
        permuted, "blk.0.attn_k.weight").weights
    np.testing.assert_array_equal(undone, weights)
    head = gguf_export.permute(np.arange(8.0)[:, None], 1, 1)[:, 0]  # one head: halves interleaved
    np.testing.assert_array_equal(head, [0, 4, 1, 5, 2, 6, 3, 7])


def test_the_tolerance_fails_a_file_whose_q_and_k_were_not_permuted(sft_run):
    """What transformers reads from a file written without the permutation: q and k un-permuted once too often."""
    import torch
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from afinar.core.config import ModelArgs
    from afinar.core.models import load_causal_lm, load_tokenizer

    args = ModelArgs(name=str(sft_run / "model"))
    model, tokenizer = load_causal_lm(args).eval(), load_tokenizer(args)
    prompts = [GenerationFormat(chat=True, system=SYSTEM).prompt_ids(tokenizer, p) for p in gguf_export.CHECK_PROMPTS]
    reference = gguf_export._logits(model, prompts)
    undo = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    with torch.no_grad():
        for layer in model.model.layers:
            for name, projection in (("attn_q", layer.self_attn.q_proj), ("attn_k", layer.self_attn.k_proj)):
                weights = undo.process(projection.weight.numpy(), f"blk.0.{name}.weight").weights
                projection.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights)))
    figures = gguf_export.compare_logits(reference, gguf_export._logits(model, prompts))
    figures |= {"tokenizer_matches": True, "chat_template_matches": True}
    for dtype in gguf_export.DTYPES:
        assert "of the logits' std" in gguf_export.check_failure(figures, dtype)


def test_a_file_that_misses_is_deleted_and_the_error_says_by_how_much(sft_run, f16, tmp_path, monkeypatch):
    figures = {"relative_logit_diff": 0.9, "max_abs_logit_diff": 1.5, "top1_agreement": 0.5, "positions": 175}
    monkeypatch.setattr(gguf_export, "check_gguf", lambda *args: figures)
    with pytest.raises(AfinarError, match=r"\(f16\) does not match the run's model: max \|logit difference\| 1.5 is "
                                          r"0.9 of the logits' std \(tolerance 0.03 for f16\).*nothing was exported"):
        afinar.export(sft_run, format="gguf", out=tmp_path)
    assert not list(tmp_path.iterdir())


def _cli_error(capsys, *args: str) -> str:
    capsys.readouterr()  # what building the run printed
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_classifier_run_is_a_one_line_error(tiny_bert, tmp_path, capsys):
    run = make_run(tiny_bert, tmp_path)
    err = _cli_error(capsys, "export", str(run), "--format", "gguf")
    assert f"{run} is a classification run" in err and f"afinar export {run}" in err
    assert not (run / "gguf").exists()


def test_int8_and_dtype_belong_to_their_own_formats(tmp_path, capsys):
    run = str(tmp_path / "no-such-run")  # refused before the run is opened
    assert "--int8 quantizes an ONNX export" in _cli_error(capsys, "export", run, "--format", "gguf", "--int8")
    assert "--dtype applies to --format gguf" in _cli_error(capsys, "export", run, "--dtype", "q8_0")


def test_a_decoder_that_is_not_a_llama_is_refused(tiny_gpt2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    config = load_config(overrides=["task=causal_lm", f"model.name={tiny_gpt2}", f"train.output_dir={tmp_path}",
                                    "train.run_name=lm"])
    run = Run.create(config)
    AutoModelForCausalLM.from_pretrained(tiny_gpt2).save_pretrained(run.model_dir)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(run.model_dir)
    run.set_status("finished")
    err = _cli_error(capsys, "export", str(run.path), "--format", "gguf")
    assert "writes Llama-family decoders" in err and "is GPT2LMHeadModel (gpt2)" in err
    assert not list((run.path / "gguf").glob("*.gguf"))


@pytest.mark.llama_cpp
def test_llama_cpp_reads_the_file_as_transformers_reads_the_run(sft_run, f16):
    """llama.cpp (through llama-cpp-python, built from source) tokenizes afinar's rendered prompt into the very ids,
    scores it within the f16 tolerance of the run's model, and each token it decodes greedily is the run model's top
    token up to that tolerance (a random tiny model has near-ties that f16 arithmetic may break either way)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from afinar.core.config import ModelArgs
    from afinar.core.models import load_causal_lm, load_tokenizer

    args = ModelArgs(name=str(sft_run / "model"))
    tokenizer, run_model = load_tokenizer(args), load_causal_lm(args).eval()
    prompt = GenerationFormat.load(sft_run / "model", chat=True).prompt_ids(tokenizer, "Name three colours.")
    model = llama_cpp.Llama(str(sft_run / "gguf" / "model-f16.gguf"), n_ctx=256, n_threads=1, logits_all=True,
                            verbose=False)
    assert model.tokenize(tokenizer.decode(prompt).encode(), add_bos=False, special=True) == prompt
    generated = []
    for token in model.generate(prompt, temp=0.0, reset=True):
        generated.append(token)
        if len(generated) == 8:
            break
    ids = prompt + generated
    scored = np.array(model.scores[:len(ids) - 1])  # llama.cpp's logits after each token but the last
    with torch.inference_mode():
        reference = run_model(input_ids=torch.tensor([ids[:-1]])).logits[0].numpy()
    figures = gguf_export.compare_logits([reference], [scored])
    assert figures["relative_logit_diff"] <= gguf_export.TOLERANCE["f16"].relative_logit_diff
    room = 2 * gguf_export.TOLERANCE["f16"].relative_logit_diff * figures["logit_std"]
    for position, token in enumerate(generated, start=len(prompt) - 1):
        assert reference[position, token] >= reference[position].max() - room


@pytest.mark.slow
@pytest.mark.parametrize("dtype", gguf_export.DTYPES)
def test_real_smollm2_weights_stay_within_the_tolerance(dtype, tmp_path):
    """The tolerances hold on a real model: SmolLM2-135M-Instruct (the packaged asset) as a finished sft run."""
    run = Run.create(load_config(overrides=["task=sft", f"train.output_dir={tmp_path}", "train.run_name=smol"]))
    os.symlink(model_path("smollm2-135m"), run.model_dir)  # the asset's folder as the run's model
    run.set_status("finished")
    record = afinar.export(run.path, format="gguf", dtype=dtype)
    check = record["exports"][dtype]["check"]
    assert check["relative_logit_diff"] <= gguf_export.TOLERANCE[dtype].relative_logit_diff / 2
    assert check["tokenizer_matches"] and check["chat_template_matches"]
    assert "You are a helpful AI assistant named SmolLM" in (run.path / "gguf" / "Modelfile").read_text()
