"""Continuous batching: rows that join, leave and share steps decode what each would alone (the library's own
`generate` as the reference), stop strings end the text before them with the streamed pieces adding up to it,
and a cancelled or expired row leaves at the next step."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from afinar.core.errors import AfinarError
from afinar.inference.decoding import DecodingBatch, Sampling, Sequence, decode

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Hello there", "A much longer prompt than the first one, with a clause or two more", "x",
           "Name a colour, please", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tokenizer


def _batch(llama, rows: int) -> DecodingBatch:
    model, tokenizer = llama
    return DecodingBatch(model, tokenizer, {tokenizer.eos_token_id}, rows)


def _sequences(tokenizer) -> list[Sequence]:
    samplings = [Sampling(100), Sampling(7, temperature=0.8, top_p=0.9, seed=1), Sampling(30, temperature=1.2, seed=2),
                 Sampling(3), Sampling(45, temperature=0.7, top_p=0.5, seed=None)]
    return [Sequence(tokenizer(p)["input_ids"], s) for p, s in zip(PROMPTS[:4], samplings[:4])]


def test_rows_that_join_and_leave_a_shared_batch_decode_what_each_decodes_alone(llama):
    model, tokenizer = llama
    # three rows at most: the short ones leave and the last joins while the 100-token row is mid-way
    together = decode(_batch(llama, 3), _sequences(tokenizer))
    alone = [decode(_batch(llama, 1), [seq])[0] for seq in _sequences(tokenizer)]
    for shared, single in zip(together, alone):
        assert shared.ids == single.ids and shared.text == single.text
        assert shared.finish_reason == single.finish_reason == "length"  # the tiny model never says EOS here
    assert [len(seq.ids) for seq in together] == [100, 7, 30, 3]
    # greedy decoding is the library's: the same tokens as `generate`, through the growing key/value buffers
    reference = model.generate(torch.tensor([together[0].prompt_ids]), max_new_tokens=100, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert together[0].ids == reference[0, len(together[0].prompt_ids):].tolist()
    # a seed is a row's own: another seed samples other tokens
    other = decode(_batch(llama, 1), [Sequence(together[2].prompt_ids, Sampling(30, temperature=1.2, seed=3))])[0]
    assert other.ids != together[2].ids


def test_a_stop_string_ends_the_text_before_it_and_the_streamed_pieces_add_up_to_the_text(llama):
    _, tokenizer = llama
    prompt = tokenizer(PROMPTS[4])["input_ids"]
    full = decode(_batch(llama, 1), [Sequence(prompt, Sampling(40))])[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # three characters mid-text: across token boundaries
    pieces: list[str] = []
    seq = decode(_batch(llama, 1), [Sequence(prompt, Sampling(40, stop=("never there", stop)), on_text=pieces.append)])[0]
    assert seq.finish_reason == "stop" and seq.text == full[:full.index(stop)] == "".join(pieces)
    assert len(pieces) > 1  # streamed as it went, not at the end
    # a tail that looks like the start of a stop string is held back, then released when it does not become one
    pieces.clear()
    seq = decode(_batch(llama, 1), [Sequence(prompt, Sampling(40, stop=(full[-2:] + "\x00",)), on_text=pieces.append)])[0]
    assert seq.finish_reason == "length" and seq.text == "".join(pieces) == full


def test_a_cancelled_row_and_a_row_past_its_deadline_leave_at_the_next_step(llama):
    _, tokenizer = llama
    batch = _batch(llama, 4)
    cancelled, expired, kept = (Sequence(tokenizer(p)["input_ids"], Sampling(50), time_limit_s=limit)
                                for p, limit in zip(PROMPTS, (None, 0.0, None)))
    batch.admit([cancelled, expired, kept])
    cancelled.cancel()
    batch.step()
    assert batch.rows == [kept] and (cancelled.finish_reason, expired.finish_reason) == ("cancelled", "timeout")
    assert len(cancelled.ids) == len(expired.ids) == 1 and len(kept.ids) == 2


def test_sampling_settings_out_of_range_are_refused():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"seed": -1}, {"stop": ("",)}):
        with pytest.raises(AfinarError):
            Sampling(**{"max_new_tokens": 4, **bad})
