"""Backends behind one predictor interface: torch, torch-bf16, onnx, onnx-int8, auto; failures and fallbacks."""

import json
import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from conftest import LABELS, TEXTS, make_run

from afinar.core.errors import AfinarError
from afinar.inference.export import export_run
from afinar.inference.predictors import Classifier, OnnxClassifier, load_predictor


@pytest.fixture(scope="module")
def exported_run(tiny_bert, tmp_path_factory):
    run = make_run(tiny_bert, tmp_path_factory.mktemp("inference"))
    export_run(run, int8=True)
    return run


@pytest.fixture
def run_copy(exported_run, tmp_path):
    """A copy to break or edit; the module's export stays intact."""
    return shutil.copytree(exported_run, tmp_path / "r")


def set_changes(run, int8: float | None, fp32: float = 0.0, speeds: tuple = (100.0, 200.0, 400.0),
                bf16: tuple = (0.0, 50.0)) -> None:
    """Rewrite the export's record: accuracy changes and texts/s of torch, onnx and onnx-int8 (and torch-bf16's
    accuracy change and speed: by default slower than torch, as on a CPU that emulates bf16)."""
    record_file = run / "onnx" / "export.json"
    record = json.loads(record_file.read_text())
    record["backends"]["torch"]["texts_per_second"] = speeds[0]
    record["backends"]["torch-bf16"].update(accuracy_change_points=bf16[0], texts_per_second=bf16[1])
    record["backends"]["onnx"].update(accuracy_change_points=fp32, texts_per_second=speeds[1])
    if int8 is None:
        record["backends"].pop("onnx-int8", None)
    else:
        record["backends"]["onnx-int8"].update(accuracy_change_points=int8, texts_per_second=speeds[2])
    record_file.write_text(json.dumps(record))


def test_backend_switches_what_runs(exported_run):
    torch_model = load_predictor(exported_run, "torch")
    bf16 = load_predictor(exported_run, "torch-bf16")
    fp32 = load_predictor(exported_run, "onnx")
    int8 = load_predictor(exported_run, "onnx-int8")
    assert type(torch_model) is Classifier and torch_model.backend == "torch"
    assert type(bf16) is Classifier and bf16.backend == "torch-bf16"
    # bf16 autocast: close to fp32 (8 mantissa bits), not equal (it really ran in bf16)
    assert np.allclose(bf16.scores(TEXTS), torch_model.scores(TEXTS), atol=2e-2)
    assert not np.array_equal(bf16.logits(TEXTS), torch_model.logits(TEXTS))
    for predictor, file in ((fp32, "model.onnx"), (int8, "model.int8.onnx")):
        assert isinstance(predictor, OnnxClassifier) and isinstance(predictor.session, ort.InferenceSession)
        assert predictor.path == exported_run / "onnx" / file
    assert torch_model.max_length == fp32.max_length == 32  # the run's data.max_length
    assert torch_model.labels == fp32.labels == int8.labels == LABELS
    assert np.allclose(torch_model.scores(TEXTS), fp32.scores(TEXTS), atol=1e-5)
    assert load_predictor(exported_run / "model", "torch").labels == LABELS  # a run's model folder works too
    assert isinstance(load_predictor(exported_run / "onnx", "onnx"), OnnxClassifier)  # and an export folder


@pytest.mark.parametrize("backend", ["torch", "torch-bf16", "onnx", "onnx-int8"])
def test_every_backend_keeps_input_order(exported_run, backend):
    predictor = load_predictor(exported_run, backend)
    forward = predictor.scores(TEXTS, batch_size=4)
    backward = predictor.scores(list(reversed(TEXTS)), batch_size=4)
    assert np.allclose(forward, backward[::-1], atol=1e-6 if backend != "torch-bf16" else 1e-2)
    if backend != "onnx-int8":  # dynamic int8 scales activations per batch: its scores depend on the batch
        assert np.allclose(forward, predictor.scores(TEXTS, batch_size=3),
                           atol=1e-5 if backend != "torch-bf16" else 1e-2)
    assert [p.text for p in predictor.predict(TEXTS, batch_size=2)] == TEXTS


@pytest.mark.parametrize("int8, fp32, speeds, expected", [
    (0.3, 0.0, (100, 200, 400), "onnx-int8"),  # within tolerance (a gain is fine too) and fastest
    (-0.4, 0.0, (100, 200, 400), "onnx-int8"),
    (-1.0, 0.0, (100, 200, 400), "onnx"),  # int8 lost a point: fp32 ONNX
    (0.0, 0.0, (175, 200, 150), "onnx"),  # int8 slower than fp32 (a CPU without VNNI), as measured at export
    (None, 0.0, (100, 200, 400), "onnx"),  # exported without --int8
    (-1.0, -0.6, (100, 200, 400), "torch"),
    (0.0, 0.0, (300, 200, 250), "torch"),  # no export is faster
])
def test_auto_picks_the_fastest_backend_within_tolerance(run_copy, int8, fp32, speeds, expected):
    set_changes(run_copy, int8, fp32, speeds)
    assert load_predictor(run_copy, "auto").backend == expected


@pytest.mark.parametrize("bf16, expected", [
    ((0.1, 900.0), "torch-bf16"),  # native bf16: fastest, same accuracy
    ((-0.8, 900.0), "onnx-int8"),  # fast, but lost 0.8 points
    ((0.0, 60.0), "onnx-int8"),  # emulated bf16: slower than torch
])
def test_auto_weighs_torch_bf16_like_the_exports(run_copy, bf16, expected):
    set_changes(run_copy, 0.0, 0.0, (100, 200, 400), bf16)
    assert load_predictor(run_copy, "auto").backend == expected


def test_auto_without_an_export_is_torch(tiny_bert, tmp_path):
    assert type(load_predictor(make_run(tiny_bert, tmp_path), "auto")) is Classifier


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_broken_onnx_is_an_error_when_asked_for_and_a_fallback_for_auto(run_copy, damage, caplog):
    model = run_copy / "onnx" / "model.onnx"
    if damage == "missing":
        model.unlink()
    else:
        model.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    set_changes(run_copy, None)  # auto would pick fp32 ONNX
    message = "model.onnx not found; export it" if damage == "missing" else "model.onnx cannot be loaded"
    with pytest.raises(AfinarError, match=message) as info:
        load_predictor(run_copy, "onnx")
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.INFO, logger="afinar"):
        predictor = load_predictor(run_copy, "auto")
    assert type(predictor) is Classifier
    assert any("falling back to torch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert load_predictor(run_copy, "onnx-int8").backend == "onnx-int8"  # the int8 file is still fine


def test_unknown_backend_is_refused(exported_run):
    with pytest.raises(AfinarError, match="backend must be one of torch, torch-bf16, onnx, onnx-int8, auto"):
        load_predictor(exported_run, "tensorrt")
