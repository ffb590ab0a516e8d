"""One generation path for causal LMs: `afinar generate`, both OpenAI-compatible endpoints and sft's in-run checks
all render prompts and sample here.

What a model was trained to see before an answer is its `GenerationFormat`, saved beside the chat template in the
run's `model/` folder (`generation.json`): whether prompts are chat messages, the system prompt and the
`sft.template` training used, whether a plain prompt starts with the tokenizer's BOS, and the EOS that ended each
answer. Prompts rendered under it have the very token ids training saw, whoever sends them. `Generator` loads a
model once, on the GPU when there is one (in bf16 there when the run trained in bf16; fp32 on a CPU), and samples
with a seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from afinar.core.config import ModelArgs
from afinar.core.errors import AfinarError
from afinar.core.models import load_causal_lm, load_tokenizer, max_positions, resolve
from afinar.core.runs import Run, read_json, write_json
from afinar.inference.decoding import GREEDY_BELOW, MAX_SEED, DecodingBatch, Sampling, Sequence, decode

FORMAT_FILE = "generation.json"

# Sampling defaults of `afinar generate`, `api.generate` and the OpenAI-compatible endpoints alike.
MAX_NEW_TOKENS = 128
TEMPERATURE = 0.8  # 0 decodes greedily
TOP_P = 0.95
SEED = 0
__all__ = ["GREEDY_BELOW", "MAX_SEED", "GenerationFormat", "Generator", "Sampling", "Sequence"]


@dataclass
class GenerationFormat:
    """What a model was trained to see before its answer; the default is a base model's: plain continuation with
    the tokenizer's own BOS convention."""

    chat: bool = False  # prompts are chat messages, rendered through the chat template saved with the model
    system: str | None = None  # the system prompt training put before conversations that had none
    template: str | None = None  # `sft.template`: wrapped the user text ({text}) in training
    labels: list[str] = field(default_factory=list)  # the label names that filled the template's {labels}
    bos: bool = True  # a plain prompt gets the tokenizer's special tokens (BOS); chat prompts get only the template's
    eos_token: str | None = None  # training ended each document or answer with it: generation stops there

    def save(self, model_dir: str | Path) -> None:
        write_json(Path(model_dir) / FORMAT_FILE, asdict(self))

    @classmethod
    def load(cls, model_dir: str | Path, chat: bool = False) -> GenerationFormat:
        """The format saved in `model_dir`; without one (a base model, or a run saved before formats were), plain
        continuation, or chat messages when `chat` (the run's task trained on them)."""
        file = Path(model_dir) / FORMAT_FILE
        if not file.is_file():
            return cls(chat=chat)
        saved = read_json(file)
        known = set(cls.__dataclass_fields__)
        if not isinstance(saved, dict) or not set(saved) <= known:
            raise AfinarError(f"{file}: not a generation format afinar wrote (fields {', '.join(sorted(known))}); "
                              f"restore it, or delete it to generate as from a base model")
        return cls(**saved)

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """`prompt` as training saw its texts: for chat, the user message (wrapped in the trained template) after
        the trained system prompt; otherwise the text, with BOS only when training put one there."""
        if not prompt.strip():
            raise AfinarError("the prompt is empty; give the text to continue")
        if not self.chat:
            return tokenizer(prompt, add_special_tokens=self.bos)["input_ids"]
        text = self.template.format(text=prompt, labels=", ".join(self.labels)) if self.template else prompt
        return self.chat_ids(tokenizer, [{"role": "user", "content": text}])

    def chat_ids(self, tokenizer, messages: list[dict[str, str]]) -> list[int]:
        """`messages` through the chat template, with the generation prompt. A conversation that does not open with
        a system message gets the trained one, as training did (Ollama's SYSTEM); a client's own wins."""
        from afinar.data import chat

        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        return chat.render_ids(tokenizer, messages, generation_prompt=True)


class Generator:
    """A causal LM and its tokenizer, loaded once, with the format it was trained to see. Decoding is
    `inference.decoding`'s, alone or in batches, the server's included: one sampler for every path."""

    def __init__(self, args: ModelArgs, prompt_format: GenerationFormat, bf16: bool = False):
        import torch

        path = resolve(args)
        self.format = prompt_format
        self.tokenizer = load_tokenizer(args, path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if bf16 and self.device.type == "cuda" else torch.float32
        self.model = load_causal_lm(args, path, self.tokenizer).to(device=self.device, dtype=dtype).eval()
        self.limit = max_positions(self.model)
        self.stop_ids = self._stop_ids()

    @classmethod
    def for_run(cls, run: Run, chat_prompts: bool) -> Generator:
        """A finished run's model, in its training precision; `chat_prompts`: its task trained on chat messages."""
        return cls(ModelArgs(name=str(run.model_dir)), GenerationFormat.load(run.model_dir, chat_prompts),
                   run.trained_in_bf16())

    def _stop_ids(self) -> set[int]:
        """Where an answer ends: the token training ended answers with; for a model without a format, the one its
        generation config names (else its tokenizer's EOS)."""
        if self.format.eos_token:
            return {self.tokenizer.convert_tokens_to_ids(self.format.eos_token)}
        configured = self.model.generation_config.eos_token_id
        if configured is None:
            configured = self.tokenizer.eos_token_id
        return set(configured) if isinstance(configured, list) else {configured}

    def room(self, prompt_ids: list[int], max_new_tokens: int) -> int:
        """New tokens the model can add after `prompt_ids`: `max_new_tokens` is "at most" (as in OpenAI's API),
        so it is cut to the model's positions left (the answer then ends with finish reason "length"); a prompt
        that leaves no position is an error."""
        if self.limit is None:
            return max_new_tokens
        if len(prompt_ids) >= self.limit:
            raise AfinarError(f"the prompt ({len(prompt_ids)} tokens) fills the model's {self.limit} positions; "
                              f"shorten it")
        return min(max_new_tokens, self.limit - len(prompt_ids))

    def batch(self, max_rows: int) -> DecodingBatch:
        """An empty continuous batch on this model (the server keeps one)."""
        return DecodingBatch(self.model, self.tokenizer, self.stop_ids, max_rows)

    def sequence(self, prompt_ids: list[int], sampling: Sampling, **hooks) -> Sequence:
        """A request for `prompt_ids`, its token budget cut to the positions the model has left."""
        return Sequence(prompt_ids, dataclasses.replace(sampling, max_new_tokens=self.room(
            prompt_ids, sampling.max_new_tokens)), **hooks)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
                 top_p: float = TOP_P, seed: int | None = SEED, stop: tuple[str, ...] = ()) -> Sequence:
        """New tokens after `prompt_ids`, up to and including a stop token (its `text`: the new text, special
        tokens dropped, cut before a stop string). Sampling is seeded (same seed, same text; None: unseeded); a
        temperature below `GREEDY_BELOW` (0 included) decodes greedily."""
        seq = self.sequence(prompt_ids, Sampling(max_new_tokens, temperature, top_p, seed, stop))
        return decode(self.batch(1), [seq])[0]

    def greedy_answers(self, prompts: list[list[int]], max_new_tokens: int, max_rows: int = 8) -> list[str]:
        """Greedy answers to many prompts, decoded `max_rows` at a time."""
        sequences = [self.sequence(ids, Sampling(max_new_tokens)) for ids in prompts]
        return [seq.text for seq in decode(self.batch(max_rows), sequences)]
