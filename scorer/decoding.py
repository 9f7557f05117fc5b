"""The policy's decode loop for serving: per-token steps, stop sequences, exact token counts, seeds.

Why it exists: ``transformers``' ``generate`` answers with finished sequences; serving needs more per
request: text deltas while decoding (streaming), stop sequences enforced on the decoded text (cut at
the first one, never sent to a client even in part), the number of tokens each completion really
used (OpenAI ``usage``), and seeds that reproduce a completion whatever else the process is doing.
So the scorer runs its own loop over the causal LM with a KV cache:

* the ``n`` completions of one request are rows of one batch over the same (unpadded) prompt;
* each step scales the last logits by ``1 / temperature``, keeps the smallest set of tokens whose
  probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020, sec. 3.1) and samples with a
  ``torch.Generator`` owned by the request (seeded when the request has a seed), so the global RNG
  is never touched; temperature 0 takes the argmax (greedy, one row repeated ``n`` times);
* a row ends at its end-of-sequence token (counted, not shown), when its text contains a stop
  sequence (cut before it) or after ``max_tokens`` (finish reason ``length``).

Everything here is blocking torch work: the engine runs it on the generation thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

STOP = "stop"
LENGTH = "length"


@dataclass(frozen=True)
class DecodeParams:
    """Resolved sampling settings for one request (the engine fills in defaults)."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One row's progress: generated ids, the text shown so far, and how it ended (None = running)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Decoded:
    """What one request produced: a completion per row, and the prompt's token count."""

    completions: tuple[Completion, ...]
    prompt_tokens: int

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)


#: ``on_delta(index, text)`` receives the newly final text of one row after a step.
OnDelta = Callable[[int, str], None]


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top-p nucleus set to -inf.  ``logits``: (B, V).

    The nucleus is the smallest set of most probable tokens whose total probability reaches
    ``top_p``; the most probable token is always kept.
    """
    if top_p >= 1.0:
        return logits
    probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)  # (B, V)
    before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop sequence in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop sequence (so must not be sent yet)."""
    keep = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


def _eos_ids(hf_model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(i) for i in ids if i is not None}


def _advance(row: Completion, tokenizer: Any, stop: Sequence[str], final: bool, shown: int) -> str:
    """Decode the first ``shown`` ids of ``row``; apply stop sequences; return the text that became final."""
    text = tokenizer.decode(row.token_ids[:shown], skip_special_tokens=True)
    cut = first_stop(text, stop)
    if cut is not None:
        text = text[:cut]
        row.finish_reason = STOP
        final = True
    row.text = text
    if final:
        ready = len(text)
    else:
        # A partly decoded multi-byte character shows as U+FFFD until its last byte arrives.
        ready = len(text.rstrip("\ufffd"))
        ready -= held_back(text[:ready], stop)
    if ready <= row.emitted:
        return ""
    delta, row.emitted = text[row.emitted:ready], ready
    return delta


def decode(
    hf_model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    params: DecodeParams,
    *,
    on_delta: OnDelta | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Decoded:
    """Sample ``params.n`` completions of one tokenized prompt (blocking; call off the event loop).

    ``on_delta`` is called from this thread as text becomes final; ``cancelled()`` is polled every
    step and ends decoding early (the client went away).
    """
    if not prompt_ids:
        raise ValueError("decode needs at least one prompt token")
    device = next(hf_model.parameters()).device
    rows = 1 if params.greedy else params.n
    eos = _eos_ids(hf_model, tokenizer)
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(int(params.seed))
    else:
        generator.seed()
    done = [Completion(i) for i in range(rows)]
    ids = torch.tensor([list(prompt_ids)] * rows, dtype=torch.long, device=device)  # (R, T)
    cache = None
    with torch.inference_mode():
        for step in range(params.max_tokens):
            if cancelled is not None and cancelled():
                break
            out = hf_model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (R, V)
            if params.greedy:
                nxt = torch.argmax(logits, dim=-1)  # (R,)
            else:
                logits = nucleus_filter(logits / params.temperature, params.top_p)
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)  # (R,)
            last = step == params.max_tokens - 1
            for row, token in zip(done, nxt.tolist()):
                if row.finish_reason is not None:
                    continue
                row.token_ids.append(int(token))
                is_eos = int(token) in eos  # counted as generated, never shown
                shown = len(row.token_ids) - int(is_eos)
                delta = _advance(row, tokenizer, params.stop, is_eos or last, shown)
                if row.finish_reason is None and (is_eos or last):
                    row.finish_reason = STOP if is_eos else LENGTH
                if delta and on_delta is not None:
                    # Greedy rows are one row shown n times.
                    for index in range(params.n) if params.greedy else (row.index,):
                        on_delta(index, delta)
            if all(r.finish_reason is not None for r in done):
                break
            ids = nxt.unsqueeze(-1)  # (R, 1)
    for row in done:  # cancelled mid-way: whatever was decoded, as if max_tokens had been reached
        if row.finish_reason is None:
            row.finish_reason = LENGTH
    if params.greedy and params.n > 1:
        only = done[0]
        done = [Completion(i, list(only.token_ids), only.text, only.emitted, only.finish_reason)
                for i in range(params.n)]
    return Decoded(tuple(done), len(prompt_ids))


__all__ = ["Completion", "DecodeParams", "Decoded", "LENGTH", "STOP", "decode", "first_stop", "held_back",
           "nucleus_filter"]
