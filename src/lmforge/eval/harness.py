"""The `lmforge` model type of lm-evaluation-harness: any run, scored on its own model and tokenizer.

`lm_eval --model lmforge --model_args run=RUN_DIR --tasks ...` (lm_eval_plugin.py says how lm-eval finds
the name) and `lmforge eval --harness TASKS` (harness_report.py) both evaluate through this class, which
asks everything of `LLM`: its loglikelihoods() for multiple choice and perplexity, its complete() for
generation. No Hugging Face model is built.

It answers lm-eval's requests the way lm-eval's own HF model (`--model hf`) does on the run's HF export,
so the two give the same numbers (tests/test_harness.py): a context that is empty is the end-of-text
token every document starts with; a context and continuation longer than the model's window lose tokens
from the left; a text scored whole (perplexity tasks) is cut into lm-eval's rolling windows of the
window's length; a generation stops at the request's `until` strings or after `max_gen_toks` tokens, its
context cut from the left to leave room for them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from ..api import LLM, sampling_params
from ..data.chat_template import END_TOKEN, JINJA, SPECIAL_TOKENS, ChatTemplate
from ..data.tokenizer_kinds import EOS_TOKEN
from ..errors import LmforgeError
from .lm_eval_plugin import register

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8  # what `--batch_size auto` gets: lmforge does not search for the largest batch
# Generation settings of lm-eval's requests that lmforge's sampling takes; others are ignored with a warning.
SAMPLING_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)
LM_EVAL_KEYS = ("do_sample", "until", "max_gen_toks")


class HarnessError(LmforgeError, ValueError):
    """A model argument or a request the lmforge model type cannot serve; the message says what to do."""


def pick_device(device: str | None) -> str:
    """The device to load on: lm-eval's CLI asks for cuda:0 when --device is not given, so a CUDA device
    on a machine without one means "not chosen" (as for lm-eval's HF model), and auto picks."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s: this machine has no CUDA GPU; choosing the device automatically", device)
        return "auto"
    return device or "auto"


def parse_batch_size(value: int | str | None) -> int:
    """A batch size from lm-eval's --batch_size: a number, or auto / auto:N (a fixed default here)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise HarnessError(f"batch_size {value!r}: give a number of requests per forward pass") from None
    if size < 1:
        raise HarnessError(f"batch_size {value}: must be at least 1")
    return size


class LmforgeLM(TemplateLM):
    """An lmforge run as an lm-eval model: `--model lmforge --model_args run=RUN_DIR[,quantize=int8]`.

    Model args: run (RUN_DIR or a checkpoint directory; `pretrained` is taken as another name for it),
    device (auto), batch_size, max_length (the window, default the model's context), max_gen_toks
    (default 256, as lm-eval's HF model), quantize (int8).
    """

    backend = "causal"

    def __init__(
        self,
        run: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        quantize: str | None = None,
        pretrained: str | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it for --batch_size auto; nothing to search here
        llm: LLM | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise HarnessError(
                f"model_args {', '.join(sorted(unknown))}: unknown to the lmforge model; it takes run, device, "
                "batch_size, max_length, max_gen_toks and quantize"
            )
        if llm is None:
            if not (run or pretrained):
                raise HarnessError("no run to evaluate: give --model_args run=RUN_DIR")
            llm = LLM.load(run or pretrained, device=pick_device(device), quantize=quantize)
        self.llm = llm
        self._device = llm.model.wte.weight.device
        self.batch_size = parse_batch_size(batch_size)
        self.max_length = int(max_length) if max_length else llm.context_len
        if not 2 <= self.max_length <= llm.context_len:
            raise HarnessError(
                f"max_length {max_length}: the model sees 2 to {llm.context_len} tokens (its context_len)"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.template: ChatTemplate | None = llm.template
        # Text of control tokens that lm-eval's prompts carry (a chat transcript is handed over as text).
        names = [EOS_TOKEN, *(SPECIAL_TOKENS if self.template else ())]
        self._control = {name: int(llm.tokenizer.hf.token_to_id(name)) for name in names}
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    # ---- tokens ---------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token: documents start with it, so it is also the context of an empty one."""
        return self.llm.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of lm-eval's text: control tokens written as text (<|endoftext|>, and a chat
        template's roles) become those tokens, as a Hugging Face tokenizer reads them; the rest is text."""
        ids: list[int] = []
        for piece in self._split.split(string):
            if piece in self._control:
                ids.append(self._control[piece])
            elif piece:
                ids.extend(self.llm.tokenizer.encode(piece))
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """The text of token ids."""
        return self.llm.tokenizer.decode(tokens)

    # ---- scoring --------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each (key, context ids, continuation ids), batch_size at a time."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            try:
                scores = self.llm.loglikelihoods(pairs, self.batch_size, self.max_length, bar.update)
            except ValueError as e:
                raise HarnessError(f"a request cannot be scored: {e}") from None
        for (key, _, _), answer in zip(requests, scores, strict=True):
            if key is not None:  # rolling windows have none; their document is cached whole
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each text whole, in lm-eval's rolling windows of max_length tokens: every
        token predicted once, the first from the end-of-text token, each window as full as it can be."""
        windows, counts = [], []
        for (text,) in [req.args for req in requests]:
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pairs = [lm_utils.make_disjoint_window(pair) for pair in rolling]
            windows += [(None, context, continuation) for context, continuation in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for req, n in zip(requests, counts, strict=True):
            totals.append(sum(score for score, _ in scores[start : start + n]))
            start += n
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, totals[-1])
        return totals

    # ---- generation -----------------------------------------------------------------------------------

    def _sampling(self, gen_kwargs: dict, max_new_tokens: int):
        """lmforge's SamplingParams for one group of requests (greedy unless do_sample)."""
        kwargs = dict(gen_kwargs)
        sample = kwargs.pop("do_sample", False)
        ignored = sorted(k for k in kwargs if k not in SAMPLING_KEYS and k not in LM_EVAL_KEYS)
        if ignored:
            log.warning("generation settings %s are not used by the lmforge model", ", ".join(ignored))
        settings = {k: kwargs[k] for k in SAMPLING_KEYS if kwargs.get(k) is not None}
        if not sample:
            settings["temperature"] = 0.0
        return sampling_params(**settings, max_new_tokens=max_new_tokens)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings or max_gen_toks tokens; the text before
        the stop string. Requests with the same settings are decoded together, batch_size at a time."""
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        out = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                contexts, settings = zip(*chunk, strict=True)
                kwargs = dict(normalize_gen_kwargs(settings[0], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=EOS_TOKEN)
                room = self._room(int(kwargs.pop("max_gen_toks")))
                prompts = [self.tok_encode(context)[-(self.max_length - room) :] for context in contexts]
                stops = [*until, END_TOKEN] if self.template else until  # a chat reply ends at <|end|>
                done = self.llm.complete(prompts, room, self._sampling(kwargs, room), stop=stops)
                for context, gen_kwargs, completion in zip(contexts, settings, done, strict=True):
                    text = postprocess_generated_text(self._reply(completion.token_ids), until, None)
                    out.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(chunk))
        return order.get_original(out)

    def _reply(self, ids: list[int]) -> str:
        """The text of generated tokens as lm-eval's HF model decodes them (control tokens left out, bytes
        that form no character as U+FFFD), up to a chat template's end of turn."""
        if self.template is not None and self.template.end_id in ids:
            ids = ids[: ids.index(self.template.end_id)]
        return self.llm.tokenizer.hf.decode(ids, skip_special_tokens=True)

    def _room(self, max_gen_toks: int) -> int:
        """New tokens a generation may write: max_gen_toks, less where the window could not hold them."""
        room = min(max_gen_toks, self.max_length - 1)
        if room < max_gen_toks:
            log.warning(
                "max_gen_toks %d does not fit the model's window of %d tokens: generating at most %d",
                max_gen_toks,
                self.max_length,
                room,
            )
        return room

    # ---- chat -----------------------------------------------------------------------------------------

    def _chat(self) -> ChatTemplate:
        if self.template is None:
            raise HarnessError(
                f"run '{self.llm.name}' has no chat template (its tokenizer has none of "
                f"{', '.join(SPECIAL_TOKENS)}): evaluate it without applying a chat template"
            )
        return self.template

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's fingerprint, which lm-eval keys its cache of chat-templated requests by."""
        return f"lmforge-{self.llm.tokenizer.sha256()[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The run's chat template as Jinja (lm-eval records it with the results), or None when off."""
        if not chat_template:
            return None
        self._chat()
        return JINJA

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as the text of lmforge's chat template; without add_generation_prompt, a last
        assistant message is left open for the continuation (lm-eval's continue_final_message)."""
        template = self._chat()
        messages = list(chat_history)
        opened = ""
        if not add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            opened = messages.pop()["content"]
            add_generation_prompt = True
        ids, _ = template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.llm.tokenizer.decode(ids) + opened

    def get_model_info(self) -> dict:
        """What lm-eval records about the model in its results."""
        params = sum(p.numel() for p in self.llm.model.parameters())
        return {
            "model_name": self.llm.name,
            "checkpoint": str(self.llm.checkpoint) if self.llm.checkpoint else None,
            "model_num_parameters": params,
        }


# `import lmforge.eval.harness` is enough for `lm_eval.simple_evaluate(model="lmforge", ...)`.
register()
