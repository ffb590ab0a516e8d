"""Prompting: the cached prefix gives the uncached scores, calibration removes a bias, and a real instruct
model follows a biased prompt."""

import numpy as np
import pytest
import torch

from afinar.core.errors import AfinarError
from afinar.experiments.prompting import PromptArgs, PromptClassifier, balanced_shots, calibrate, class_bias

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["I love this so much!", "worst   day\never", "the bus leaves at 5", "ok", "",
         "meh, whatever; it is fine I guess but this one is quite a bit longer than the others"]
# SmolLM2's template, so the chat path is tested without the real model
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_gpt2(tiny_gpt2, tmp_path_factory):
    """The tiny GPT-2 with a chat template and room for the longer chat prompts (512 positions)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-chat-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(folder)
    return folder


def reference_scores(classifier: PromptClassifier, shots, text: str) -> np.ndarray:
    """The definition, one text at a time: the whole prompt and each verbalizer through the plain model."""
    full = classifier.render(shots, classifier.clean([text])[0])
    ids = classifier.prefix_ids + classifier._ids(full[len(classifier.prefix):])
    out = []
    for verbalizer in classifier.verbalizer_ids:
        with torch.inference_mode():
            logprobs = classifier.model(torch.tensor([ids + verbalizer])).logits.log_softmax(-1)[0]
        out.append(sum(logprobs[len(ids) - 1 + j, token].item() for j, token in enumerate(verbalizer)))
    return np.array(out)


@pytest.mark.parametrize("chat, verbalizers", [(False, None), (True, ["very bad", "so so", "really good"])])
def test_cached_prefix_scores_equal_uncached(request, tiny_gpt2, chat, verbalizers):
    model = request.getfixturevalue("tiny_chat_gpt2") if chat else tiny_gpt2
    # batches of 2 rows: the stored prefix is expanded and reused by several batches of different widths
    classifier = PromptClassifier(PromptArgs(model=str(model), prompt_batch_size=2, verbalizers=verbalizers),
                                  LABELS)
    assert classifier.chat is chat and classifier.single_token is (verbalizers is None)
    assert classifier.prefix.endswith("Text:")
    assert classifier.verbalizer_ids[0] == classifier._ids("negative" if chat else " negative") or verbalizers
    per_text = [[("so good", 2), ("bad bad", 0)], [("fine", 1)]] * 3
    for shots, own in (([], None), ([("great", 2), ("awful", 0), ("fine", 1)], None), ([], per_text)):
        classifier.set_prompt(shots, per_text_shots=own is not None)
        assert classifier._prefix_kv is not None
        stored = [k.clone() for k, _ in classifier._prefix_kv]
        cached = classifier.scores(TEXTS, own)
        np.testing.assert_allclose(cached, classifier.scores(TEXTS, own, use_cache=False), atol=1e-4)
        for i in (1, 5):
            expected = reference_scores(classifier, own[i] if own else classifier.shots, TEXTS[i])
            np.testing.assert_allclose(cached[i], expected, atol=1e-4)
        assert all(torch.equal(a, k) for a, (k, _) in zip(stored, classifier._prefix_kv))  # never written to
        assert np.all(cached < 0) and cached.shape == (len(TEXTS), 3)


def test_a_prompt_longer_than_the_model_is_an_error(tiny_gpt2):
    classifier = PromptClassifier(PromptArgs(model=str(tiny_gpt2), max_text_tokens=200), LABELS)
    with pytest.raises(AfinarError, match="prompt.max_text_tokens"):
        classifier.scores(["word " * 150])


def test_calibration_removes_a_constant_bias():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    true = np.eye(3)[labels] + rng.normal(0, 0.1, size=(300, 3))  # scores that separate the classes
    bias = np.array([5.0, -2.0, 0.5])  # the model prefers class 0 whatever the text
    held_out, train = true[:100] + bias, true[100:] + bias
    assert (held_out.argmax(1) == 0).all()  # raw: always class 0
    estimated = class_bias(train)  # estimated on other (training) texts, labels unused
    assert (calibrate(held_out, estimated).argmax(1) == labels[:100]).mean() == 1.0


def test_balanced_shots_are_class_balanced_and_seeded():
    texts = [f"t{i}" for i in range(30)]
    labels = [0] * 20 + [1] * 8 + [2] * 2
    shots = balanced_shots(texts, labels, 6, 3, seed=1)
    assert sorted(label for _, label in shots) == [0, 0, 1, 1, 2, 2]
    assert shots == balanced_shots(texts, labels, 6, 3, seed=1) != balanced_shots(texts, labels, 6, 3, seed=2)
    assert sorted(label for _, label in balanced_shots(texts, labels, 9, 3, seed=1)).count(2) == 2  # all there is


def test_few_shot_examples_open_the_shared_prefix(tiny_gpt2):
    classifier = PromptClassifier(PromptArgs(model=str(tiny_gpt2)), LABELS)
    zero = classifier.prefix_ids
    classifier.set_prompt([("so  good\n!", 2), ("bad", 0)])
    assert classifier.prefix.count("Answer:") == 2 and "Text: so good !\nAnswer: positive" in classifier.prefix
    assert classifier.prefix_ids[:len(zero)] == zero and len(classifier.prefix_ids) > len(zero)
    classifier.set_prompt(per_text_shots=True)  # retrieval: the examples come with each text, after the prefix
    assert classifier.prefix_ids == zero
    assert "Text: near\nAnswer: neutral\n\nText: query\nAnswer:" in classifier.render([("near", 1)], "query")


def test_a_biased_prompt_moves_the_real_instruct_model():  # ~20 s on 2 idle cores, most of it building SmolLM2
    """SmolLM2-135M-Instruct: the same six plain examples, all labelled with one class, raise that class's score
    against the others (relative to zero-shot) and change the answers."""
    texts = ["I hate mondays, everything went wrong", "my phone died and I lost all my photos",
             "going to the store later", "the meeting is at 3pm", "this is so sad", "worst service ever",
             "what a beautiful day", "thanks so much, love you all"]
    examples = ["see you tomorrow", "the bus comes at noon", "I had pasta for lunch", "it is raining",
                "watching tv", "reading a book"]
    classifier = PromptClassifier(PromptArgs(prompt_batch_size=8), LABELS)
    assert classifier.chat and classifier.single_token

    def lead(scores: np.ndarray, c: int) -> float:  # class c's mean score above the other classes' mean
        return float((scores[:, c] - np.delete(scores, c, axis=1).mean(axis=1)).mean())

    zero = classifier.scores(texts)
    for c in range(3):
        classifier.set_prompt([(text, c) for text in examples])
        biased = classifier.scores(texts)
        assert lead(biased, c) > lead(zero, c) + 0.3, LABELS[c]
        assert (biased.argmax(1) == c).sum() >= (zero.argmax(1) == c).sum()
        if c == 0:
            assert (biased.argmax(1) != zero.argmax(1)).any()


def test_prompt_args_are_checked():
    with pytest.raises(AfinarError, match="prompt.calibration must be one of train, content_free, none"):
        PromptArgs(calibration="test")
    args = PromptArgs()
    args.prompt_batch_size = 0  # as a config override would set it, after construction
    with pytest.raises(AfinarError, match="prompt.prompt_batch_size must be greater than 0"):
        args.validate()


def test_scores_without_per_row_logits_to_keep_are_the_same(tiny_gpt2):
    """The fallback for a transformers whose `logits_to_keep` takes no per-row positions."""
    classifier = PromptClassifier(PromptArgs(model=str(tiny_gpt2), prompt_batch_size=3), LABELS)
    expected = classifier.scores(TEXTS)
    classifier.per_row_logits = False
    np.testing.assert_allclose(classifier.scores(TEXTS), expected, atol=1e-5)
