"""Conversations for instruction tuning: reading them from any data format afinar reads, rendering them through
a chat template, and the loss mask that trains on the assistant's tokens only.

Formats, detected by column (first match wins): `messages` (a list of {role, content}, or its JSON), `prompt` +
`completion` (or `response`), alpaca `instruction` [+ `input`] + `output`, self-instruct `instruction` +
`instances` (a list of {input, output}: one conversation per instance), and any labelled classification data
through `sft.template` (the answer is the label's name).

The mask is computed by rendering, never by searching for marker strings: for each assistant turn, the
conversation before it is rendered with the generation prompt, and the conversation up to and including it;
the tokens between the two are that turn's, and the first rendering must be a prefix of the second. A template
for which it is not (it rewrites earlier turns) is refused, since the tokens the model would see at inference
would differ from those it trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pandas as pd

from afinar.core.errors import AfinarError
from afinar.data.sources import cell_list

# For tokenizers without a chat template (GPT-2 and other base models): plain-text turns, EOS right after each
# answer. Nothing follows the EOS within the answer's turn: text after it would tokenize differently once the
# next turn follows (BPE merges "\n\n" at the end of a string but not before "###"), and the check in `encode`
# would rightly refuse the template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label `transformers` losses skip

Messages = list[dict[str, str]]


def template_of(tokenizer) -> str:
    """The chat template the tokenizer carries, or afinar's default (set on the tokenizer, so it is saved)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer.chat_template


def template_digest(tokenizer) -> str:
    return hashlib.sha256(template_of(tokenizer).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- formats


def _checked_messages(messages: list, where: str) -> Messages:
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise AfinarError(f"{where}: each message needs a role ({', '.join(ROLES)}) and text content "
                              f"(got {str(message)[:80]})")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise AfinarError(f"{where}: a conversation has no assistant message, so there is nothing to train on")
    return out


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _instruction(instruction: Any, context: Any) -> str:
    instruction, context = _text(instruction).strip(), _text(context).strip()
    return f"{instruction}\n\n{context}" if context else instruction


def detect_format(columns: list[str]) -> str:
    lower = {c.lower() for c in columns}
    if "messages" in lower or "conversations" in lower:
        return "messages"
    if "prompt" in lower and ({"completion", "response"} & lower):
        return "prompt_completion"
    if "instruction" in lower and "output" in lower:
        return "alpaca"
    if "instruction" in lower and "instances" in lower:
        return "self_instruct"
    return "unknown"


def conversations(frame: pd.DataFrame, where: str, system: str | None = None) -> list[Messages]:
    """One conversation per row (per instance for self-instruct data); `system` is prepended when given."""
    columns = {str(c).lower(): c for c in frame.columns}
    kind = detect_format(list(columns))
    found: list[Messages] = []
    for number, row in enumerate(frame.to_dict("records")):
        here = f"{where} row {number}"
        if kind == "messages":
            column = columns.get("messages", columns.get("conversations"))
            found.append(_checked_messages(cell_list(row[column], here, str(column)), here))
        elif kind == "prompt_completion":
            answer = row[columns.get("completion", columns.get("response"))]
            found.append([{"role": "user", "content": _text(row[columns["prompt"]])},
                          {"role": "assistant", "content": _text(answer)}])
        elif kind == "alpaca":
            found.append([{"role": "user", "content": _instruction(row[columns["instruction"]],
                                                                   row.get(columns.get("input")))},
                          {"role": "assistant", "content": _text(row[columns["output"]])}])
        elif kind == "self_instruct":
            for instance in cell_list(row[columns["instances"]], here, "instances"):
                found.append([{"role": "user", "content": _instruction(row[columns["instruction"]],
                                                                       instance.get("input"))},
                              {"role": "assistant", "content": _text(instance.get("output"))}])
        else:
            raise AfinarError(f"{where}: no conversation columns (columns seen: {', '.join(map(str, frame.columns))});"
                              f" give messages, prompt+completion, instruction+output or instruction+instances, or "
                              f"labelled text with --set sft.template='...{{text}}...'")
    if system:
        found = [[{"role": "system", "content": system}, *c] if c[0]["role"] != "system" else c for c in found]
    return found


def from_labels(texts: list[str], labels: list[int], label_names: list[str], template: str,
                system: str | None = None) -> list[Messages]:
    """Classification rows as instructions: `template` with {text} (and {labels}, the names joined) is the
    prompt, the label's name the answer."""
    if "{text}" not in template:
        raise AfinarError(f"sft.template must contain {{text}} where the text goes (got {template!r})")
    names = ", ".join(label_names)
    head = [{"role": "system", "content": system}] if system else []
    return [[*head, {"role": "user", "content": template.format(text=text, labels=names)},
             {"role": "assistant", "content": label_names[label]}] for text, label in zip(texts, labels)]


def from_columns(frame: pd.DataFrame, where: str, prompt_column: str, response_column: str | None,
                 reference_columns: list[str] | None, template: str | None = None, system: str | None = None
                 ) -> tuple[list[Messages], list[list[str]]]:
    """Prompt -> response conversations from two named columns (the prompt wrapped in `template`'s {text} when
    given), and each row's reference answers: `reference_columns` where the split has them, else the response.
    A split without `response_column` (a test file with several references) trains on its first reference."""
    columns = [str(c) for c in frame.columns]
    references = [c for c in reference_columns or [] if c in columns]
    answer_column = response_column if response_column in columns else (references[0] if references else None)
    if prompt_column not in columns or answer_column is None:
        wanted = [prompt_column, response_column or "", *(reference_columns or [])]
        raise AfinarError(f"{where}: needs column {prompt_column!r} and {response_column or 'a reference'!r} "
                          f"(or one of sft.reference_columns); columns: {', '.join(columns)} (asked for "
                          f"{', '.join(w for w in wanted if w)})")
    if template and "{text}" not in template:
        raise AfinarError(f"sft.template must contain {{text}} where the prompt goes (got {template!r})")
    head = [{"role": "system", "content": system}] if system else []
    found, all_references = [], []
    for number, row in enumerate(frame.to_dict("records")):
        prompt = _text(row[prompt_column])
        try:
            content = template.format(text=prompt) if template else prompt
        except (KeyError, IndexError, ValueError):
            raise AfinarError(f"sft.template may hold only {{text}} (write other braces doubled, {{{{ }}}}); got "
                              f"{template!r}") from None
        found.append([*head, {"role": "user", "content": content},
                      {"role": "assistant", "content": _text(row[answer_column])}])
        given = [_text(row[c]) for c in (references or [answer_column]) if _text(row[c]).strip()]
        if not given:
            raise AfinarError(f"{where} row {number}: no answer to train on or score against (columns "
                              f"{', '.join(references or [answer_column])} are empty)")
        all_references.append(given)
    return found, all_references


def prompt_of(messages: Messages) -> Messages:
    """The conversation up to its last assistant turn: what a user sends to get that answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompt_text(messages: Messages) -> str:
    """The non-assistant content, for the data checks (duplicates, leakage of prompts between splits)."""
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


# ---------------------------------------------------------------- tokens and the loss mask


_PROBE = [{"role": "user", "content": "Hi"}]
_CHECKED_TEMPLATES: set[str] = set()


def check_generation_prompt(tokenizer) -> None:
    """Refuse a chat template that adds nothing when asked for a generation prompt: trained through it, the loss
    would cover the assistant's header (`assistant: `) and the model would learn to write it itself, while a
    served prompt ends where no training prompt did."""
    template = template_of(tokenizer)
    if template in _CHECKED_TEMPLATES:
        return
    bare = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False)
    if tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True) == bare:
        raise AfinarError("the chat template adds nothing for add_generation_prompt, so the model would learn to "
                          "write the assistant's header itself; use a template with a generation prompt "
                          "(sft.chat_template)")
    _CHECKED_TEMPLATES.add(template)


def render_ids(tokenizer, messages: Messages, generation_prompt: bool) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, exactly as inference renders them."""
    template_of(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _without_middle(tokenizer, ids: list[int], keep: int) -> str:
    """The text of `ids` with its middle cut out, `keep` tokens left: its head and its tail stay, since an
    instruction usually sits before or after the text it is about."""
    head = (keep + 1) // 2
    tail = keep - head
    return tokenizer.decode(ids[:head]) + (tokenizer.decode(ids[-tail:]) if tail else "")


def fit_prompt(tokenizer, prompt: Messages, budget: int) -> Messages | None:
    """`prompt` with its user text shortened (each user turn's middle cut, oldest turn first) until its rendering
    with the generation prompt takes at most `budget` tokens; None when it cannot fit even with every user turn
    emptied (the system prompt and the template alone are too long). The template's own tokens (the generation
    prompt above all) are never cut: a model scored or trained on a prompt whose end is missing answers
    something else."""
    fitted = [dict(m) for m in prompt]
    for index in [i for i, m in enumerate(fitted) if m["role"] == "user"]:
        for _ in range(8):  # re-tokenizing cut text can differ by a token or two; a few rounds settle it
            excess = len(render_ids(tokenizer, fitted, generation_prompt=True)) - budget
            if excess <= 0:
                return fitted
            content = tokenizer(fitted[index]["content"], add_special_tokens=False)["input_ids"]
            if not content:
                break
            fitted[index]["content"] = _without_middle(tokenizer, content, max(0, len(content) - excess))
        else:  # eight cuts did not settle it: empty this turn unless the last cut already fits
            if len(render_ids(tokenizer, fitted, generation_prompt=True)) > budget:
                fitted[index]["content"] = ""
    return fitted if len(render_ids(tokenizer, fitted, generation_prompt=True)) <= budget else None


def fit_prompt_left(tokenizer, prompt: Messages, budget: int) -> Messages | None:
    """`prompt` cut from the left until its rendering with the generation prompt takes at most `budget` tokens:
    the oldest turn's text goes first (a turn cut to nothing is removed with its template tokens), a system
    message stays, and the last turn keeps at least its final tokens; None when even they do not fit. The latest
    turns, which the answer replies to, stay whole as long as anything older can go."""
    fitted = [dict(m) for m in prompt]
    for _ in range(64):  # each round removes a turn or cuts tokens; re-tokenizing cut text settles in a few
        excess = len(render_ids(tokenizer, fitted, generation_prompt=True)) - budget
        if excess <= 0:
            return fitted
        turns = [i for i, m in enumerate(fitted) if m["role"] != "system"]
        if not turns:
            return None
        oldest = turns[0]
        ids = tokenizer(fitted[oldest]["content"], add_special_tokens=False)["input_ids"]
        if len(ids) <= excess:
            if len(turns) == 1:
                return None
            del fitted[oldest]
        else:
            fitted[oldest]["content"] = tokenizer.decode(ids[excess:])
    return None


def answer_ids(tokenizer, prompt: Messages, answer: str, before: list[int] | None = None) -> list[int]:
    """`answer`'s tokens as the assistant's turn after `prompt`: what the template adds to `prompt` rendered with
    its generation prompt (`before`, when already rendered), i.e. the answer and its end of turn, with EOS
    appended when the template does not end the turn with one, as `encode` trains a last answer."""
    check_generation_prompt(tokenizer)
    if before is None:
        before = render_ids(tokenizer, prompt, generation_prompt=True)
    upto = render_ids(tokenizer, [*prompt, {"role": "assistant", "content": answer}], generation_prompt=False)
    if upto[:len(before)] != before:
        raise AfinarError("the chat template renders the prompt differently once an answer follows, so training and "
                          "inference would see different prompt tokens; use another template")
    turn = upto[len(before):]
    eos = tokenizer.eos_token_id
    return turn + [eos] if eos is not None and eos not in turn else turn


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the assistant's tokens
    trained: int  # assistant tokens kept after truncation
    cut: bool  # truncation removed some assistant tokens
    shortened: bool = False  # the prompt's user text was shortened so that the last answer fits


def encode(tokenizer, messages: Messages, max_length: int) -> Encoded:
    """The conversation's tokens and labels, at most `max_length` of them.

    The loss sees each assistant turn's tokens (its content and the template's end-of-turn tokens) and nothing
    else; the last answer gets EOS appended when the template does not end it with one, so the model learns to
    stop (earlier turns stay exactly as the template renders them, which is how inference will show them as
    history). A conversation too long for `max_length` first has its prompt's user text shortened
    (`fit_prompt`, as label scoring does) so that the whole last answer fits; only when even that cannot make
    room is the tail cut, answer tokens included (counted in `cut`)."""
    check_generation_prompt(tokenizer)
    whole = _encode_whole(tokenizer, messages)
    if len(whole.input_ids) <= max_length:
        return whole
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = len(whole.input_ids) - len(render_ids(tokenizer, messages[:last], generation_prompt=True))
    fitted = fit_prompt(tokenizer, messages[:last], max_length - answer) if answer < max_length else None
    if fitted is not None:
        shortened = _encode_whole(tokenizer, [*fitted, *messages[last:]])
        if len(shortened.input_ids) <= max_length:
            shortened.shortened = True
            return shortened
    ids, labels = whole.input_ids[:max_length], whole.labels[:max_length]
    trained = sum(label != IGNORE for label in labels)
    return Encoded(ids, labels, trained, trained < whole.trained)


def _encode_whole(tokenizer, messages: Messages) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_ids(tokenizer, messages[:index], generation_prompt=True)
        upto = render_ids(tokenizer, messages[:index + 1], generation_prompt=False)
        if before[:len(ids)] != ids or upto[:len(before)] != before:
            raise AfinarError("the chat template renders earlier turns differently once an answer follows, so "
                              "training and inference would see different prompt tokens; use another template "
                              "(sft.chat_template)")
        turn = upto[len(before):]
        if message["content"].strip() not in tokenizer.decode(turn):
            raise AfinarError("the chat template drops the assistant's answer (rendering it adds "
                              f"{tokenizer.decode(turn)!r}); use another template (sft.chat_template)")
        if index == last and eos is not None and eos not in turn:
            turn = turn + [eos]
        labels += [IGNORE] * (len(before) - len(ids)) + turn
        ids = before + turn
    return Encoded(ids, labels, sum(label != IGNORE for label in labels), False)
