import pytest

from afinar.core.config import Config, get_value, load_config, parse_override, to_yaml
from afinar.core.errors import AfinarError


def test_defaults_are_valid():
    config = load_config()
    assert config.model.name == "minilm-l6"
    assert config.data.source == "tweets"
    assert config.train.learning_rate is None and config.train.epochs is None  # scaled to the data per run


def test_yaml_nested_and_shorthand_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: gpt2\ndata:\n  source: x.csv\n  max_length: 64\ntrain:\n  learning_rate: 3e-5\n"
                    "max_train_samples: 100\nlora: true\n")
    config = load_config(path)
    assert config.model.name == "gpt2"
    assert config.data.source == "x.csv" and config.data.max_length == 64
    assert config.train.learning_rate == 3e-5  # YAML reads 3e-5 as a string; the field type makes it a float
    assert config.data.max_train_samples == 100
    assert config.lora.enabled is True


def test_overrides_win_over_yaml_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 8\n")
    config = load_config(path, ["train.batch_size=16", "model=smollm2-135m", "eval_every=none",
                                "lora.target_modules=q_proj,v_proj", "knn_k=3, 7", "compare.probe_c=0.5"])
    assert config.train.batch_size == 16
    assert config.model.name == "smollm2-135m"
    assert config.train.eval_every is None
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.compare.knn_k == [3, 7] and config.compare.probe_c == [0.5]  # list items typed too


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(overrides=["train.epochs=2", "data.max_test_samples=10"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("override, message", [
    ("train.learnin_rate=1e-3", "unknown config key 'train.learnin_rate'; did you mean 'train.learning_rate'?"),
    ("batchsize=4", "did you mean 'batch_size'?"),
    ("train.batch_size=0", "train.batch_size must be greater than 0 (got 0)"),
    ("train.batch_size=-4", "train.batch_size must be greater than 0 (got -4)"),
    ("train.learning_rate=-1e-5", "train.learning_rate must be greater than 0"),
    ("train.learning_rate=fast", "train.learning_rate must be float (got 'fast')"),
    ("train.batch_size=2.5", "train.batch_size must be int (got 2.5)"),
    ("knn_k=1,many", "compare.knn_k must be int (got 'many')"),
    ("prompt.calibration=test", "prompt.calibration must be one of train, content_free, none"),
    ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, fp16"),
    ("data.validation_fraction=1.5", "data.validation_fraction must be between 0 and 1"),
    ("seed", "override 'seed' must look like key=value"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(AfinarError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_override_reads_values_as_yaml():
    assert parse_override("train.epochs=2") == ("train.epochs", 2)
    assert parse_override("lora=true") == ("lora", True)
    assert parse_override("data.source=a=b.csv") == ("data.source", "a=b.csv")


def test_get_value_accepts_shorthand():
    assert get_value(Config(), "max_length") == 128


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(AfinarError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(AfinarError, match="not valid YAML"):
        load_config(bad)


def test_text_fields_keep_command_line_text_that_yaml_would_read_as_a_mapping():
    config = load_config(overrides=["sft.template=Sentiment ({labels}): {text}", "train.run_name=2026",
                                    "sft.system='quoted: yes'"])
    assert config.sft.template == "Sentiment ({labels}): {text}" and config.train.run_name == "2026"
    assert config.sft.system == "quoted: yes"
