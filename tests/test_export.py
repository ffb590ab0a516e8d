"""ONNX export of tiny encoder and decoder runs: logits match PyTorch, int8 predicts the same label set."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, TEXTS, make_run

from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.inference.export import export_run
from afinar.inference.predictors import Classifier, OnnxClassifier


def tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (SmolLM2's architecture) with the GPT-2 tokenizer: no pad token, right padding."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from afinar.core.assets import model_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["tiny_bert", "tiny_gpt2", "tiny_llama"])
def exported(request, tmp_path_factory):
    """(run folder, export record) for each architecture, exported with int8 once per module."""
    if request.param == "tiny_llama":
        model = tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    else:
        model = request.getfixturevalue(request.param)
    run = make_run(model, tmp_path_factory.mktemp(f"run-{request.param}"))
    return run, export_run(run, int8=True)


def test_export_writes_a_self_contained_folder(exported):
    run, record = exported
    folder = run / "onnx"
    for name in ("model.onnx", "model.int8.onnx", "labels.json", "export.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "labels.json").read_text()) == LABELS
    assert json.loads((folder / "export.json").read_text())["backends"] == record["backends"]
    fp32 = record["backends"]["onnx"]
    assert fp32["max_abs_logit_diff"] <= 1e-4 and fp32["label_agreement"] == 1.0
    assert fp32["accuracy"] == record["backends"]["torch"]["accuracy"]
    assert record["check"]["texts"] == 12  # the whole carved validation split (10% of 120 rows)
    for backend in ("onnx-int8", "torch-bf16"):
        assert set(record["backends"][backend]) >= {"accuracy", "accuracy_change_points", "label_agreement",
                                                    "texts_per_second"}
    assert 0 < record["backends"]["torch-bf16"]["max_abs_logit_diff"] < 0.1  # bf16 ran, and stayed close
    if "bert" in run.parent.name:  # encoders are exported with ONNX Runtime's fused operators, decoders unfused
        assert record["fused_operators"]["Attention"] == 2 and record["fused_operators"]["SkipLayerNormalization"] == 4
    else:
        assert record["fused_operators"] == {}


def test_onnx_logits_match_pytorch_on_mixed_lengths(exported):
    run, _ = exported
    torch_model = Classifier(run / "model", 32)
    onnx_model = OnnxClassifier(run / "onnx", 32)
    batched = onnx_model.logits(TEXTS, batch_size=len(TEXTS))  # one right-padded batch of six lengths
    assert np.abs(batched - torch_model.logits(TEXTS, batch_size=len(TEXTS))).max() <= 1e-4
    alone = np.concatenate([torch_model.logits([t], batch_size=1) for t in TEXTS])  # no padding at all
    assert np.abs(batched - alone).max() <= 1e-4
    assert np.abs(batched - onnx_model.logits(TEXTS, batch_size=1)).max() <= 1e-4  # unpadded in ONNX too


def test_int8_export_predicts_labels_from_the_same_set(exported):
    run, _ = exported
    int8 = OnnxClassifier(run / "onnx", 32, int8=True)
    predictions = int8.predict(TEXTS, batch_size=4)
    assert int8.labels == LABELS and {p.label for p in predictions} <= set(LABELS)
    assert [p.text for p in predictions] == TEXTS
    assert all(abs(sum(p.scores.values()) - 1) < 1e-5 for p in predictions)
    assert (run / "onnx" / "model.int8.onnx").stat().st_size < (run / "onnx" / "model.onnx").stat().st_size


def test_export_to_another_folder_without_int8(tiny_bert, tmp_path):
    run = make_run(tiny_bert, tmp_path)
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "model.int8.onnx").write_bytes(b"stale")  # from an earlier export: must not survive this one
    record = export_run(run, out=out)
    assert set(record["backends"]) == {"torch", "torch-bf16", "onnx"}
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()
    assert not (run / "onnx").exists()


def test_a_fusion_failure_keeps_a_correct_unfused_export(tiny_bert, tmp_path, monkeypatch, caplog):
    import onnxruntime.transformers.optimizer as optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("no fusable pattern")

    monkeypatch.setattr(optimizer, "optimize_model", broken)
    record = export_run(make_run(tiny_bert, tmp_path))
    assert record["fused_operators"] == {} and record["backends"]["onnx"]["max_abs_logit_diff"] <= 1e-4
    assert "could not fuse" in caplog.text and "no fusable pattern" in caplog.text


def test_an_unexportable_model_is_a_one_line_error(tiny_bert, tmp_path, monkeypatch):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::magic' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", broken)
    run = make_run(tiny_bert, tmp_path)
    with pytest.raises(AfinarError, match="cannot export BertForSequenceClassification to ONNX: .*aten::magic") \
            as info:
        export_run(run)
    assert "\n" not in str(info.value)
    assert not (run / "onnx" / "model.onnx").exists()


def test_an_export_that_does_not_match_is_refused(tiny_bert, tmp_path, monkeypatch):
    run = make_run(tiny_bert, tmp_path)
    original = OnnxClassifier._logits
    monkeypatch.setattr(OnnxClassifier, "_logits", lambda self, batch: original(self, batch) + 1e-3)
    with pytest.raises(AfinarError, match="does not match PyTorch: max \\|logit difference\\| 1.00e-03"):
        export_run(run)
    assert not (run / "onnx" / "model.onnx").exists() and not (run / "onnx" / "export.json").exists()


def test_unfinished_run_is_refused(tmp_path):
    run = Run.create(load_config(overrides=[f"train.output_dir={tmp_path}", "train.run_name=x"]))
    with pytest.raises(AfinarError, match="is running, not finished"):
        export_run(run.path)
