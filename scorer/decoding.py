"""The policy's decode loop for serving: per-token steps, stop sequences, exact token counts, seeds.

Why it exists: ``transformers``' ``generate`` answers with finished sequences; serving needs more per
request: text deltas while decoding (streaming), stop sequences enforced on the decoded text (cut at
the first one, never sent to a client even in part), the number of tokens each completion really
used (OpenAI ``usage``), and seeds whose random draws depend on nothing but the request.  So the scorer runs its own loop
over the causal LM with a KV cache (:class:`BatchDecoder`):

* the ``n`` completions of one request are rows of one batch over the same (unpadded) prompt, and
  the rows of concurrent requests decode together (continuous batching: a request joins between
  steps and leaves when its last row ends);
* each step scales the last logits by ``1 / temperature``, keeps the smallest set of tokens whose
  probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020, sec. 3.1) and samples with a
  ``torch.Generator`` owned by the request (seeded when the request has a seed), so the global RNG
  is never touched; temperature 0 takes the argmax (greedy, one row repeated ``n`` times);
* a row ends at its end-of-sequence token (counted, not shown), when its text contains a stop
  sequence (cut before it) or after ``max_tokens`` (finish reason ``length``).

Everything here is blocking torch work: the scorer runs each policy's decoder on its own thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from services.errors import Unavailable

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


@dataclass(eq=False)
class _Job:
    """One request inside the decoder: its rows, its own generator, and the future its caller waits on."""

    prompt_ids: list[int]
    params: DecodeParams
    on_delta: OnDelta | None
    cancelled: Callable[[], bool] | None
    future: concurrent.futures.Future
    generator: torch.Generator | None = None
    rows: list[Completion] = field(default_factory=list)

    @property
    def width(self) -> int:
        """Rows it decodes: 1 when greedy (one answer shown n times), else n."""
        return 1 if self.params.greedy else self.params.n


@dataclass
class _Group:
    """Requests that decode as one batch of their own (:meth:`BatchDecoder.submit_group`)."""

    jobs: list[_Job]


def _jobs_of(pending: Sequence[_Job | _Group]) -> list[_Job]:
    return [j for item in pending for j in (item.jobs if isinstance(item, _Group) else (item,))]


class BatchDecoder:
    """Decodes many requests' rows as one batch, admitting new requests between steps.

    Why: on a CPU a decode step of a small model costs nearly the same for 1 or 12 rows (the weights
    are read once per step either way; measured for SmolLM2-135M in bf16 on one core: 43 ms for 1
    row, 78 ms for 6, 88 ms for 12), so two best-of-6 requests decoded together finish in about the
    time one took alone.  A request that arrives while others decode is prefilled on its own
    (unpadded, exactly as if alone) and joins the running batch at the next step (continuous
    batching): its KV cache is left-padded to the batch's length and the padding masked, and its
    positions continue from its own prompt length.  A row leaves the batch as soon as it ends
    (end of sequence, stop sequence, ``max_tokens``, or its request cancelled), and a request's
    future resolves when its last row ends, so a short request never waits for a long one.

    Each request samples with its own ``torch.Generator`` over its own rows only, so which other
    requests share a step never changes the random numbers it draws.  What sharing can change is
    floating-point rounding: matrix products over 1 row and over many take different kernels, so a
    seeded request reproduces exactly when it decodes under the same company (alone, for instance),
    and up to rounding otherwise (OpenAI documents ``seed`` as best effort for the same reason).

    ``max_rows`` caps the rows decoded at once (a request wider than that runs alone); 1 decodes one
    request at a time.  Models whose KV cache is not a plain per-layer key/value cache (sliding
    windows, recurrent state) also decode one request at a time.

    :meth:`submit` is thread-safe; the decoding itself runs on one thread: :meth:`start` a background
    one (the scorer), or call :meth:`run` to drive on the calling thread until every request ended.
    """

    def __init__(self, hf_model: Any, tokenizer: Any, *, max_rows: int = 32, name: str = "decode") -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = hf_model
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.name = name
        self.device = next(hf_model.parameters()).device
        self.eos = _eos_ids(hf_model, tokenizer)
        self._cv = threading.Condition()
        self._pending: collections.deque[_Job | _Group] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._solo = max_rows == 1  # or once the model's cache turns out not to be mergeable
        self._cache_checked = False  # until the first prefill, requests are admitted one at a time
        # The running batch: a row per (job, completion), its KV cache, padding mask, next position, last token.
        self._rows: list[tuple[_Job, Completion]] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 = a real token
        self._pos: torch.Tensor | None = None  # (B,)
        self._last: torch.Tensor | None = None  # (B,)
        self._exclusive = False  # the running batch is a group's (submit_group): nothing else joins it
        #: The most rows decoded in one step so far (for tests and logs).
        self.peak_rows = 0

    # -- the callers' side -------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: DecodeParams, *, on_delta: OnDelta | None = None,
               cancelled: Callable[[], bool] | None = None) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its :class:`Decoded` (or the error that ended it)."""
        if not prompt_ids:
            raise ValueError("decode needs at least one prompt token")
        job = _Job(list(prompt_ids), params, on_delta, cancelled, concurrent.futures.Future())
        with self._cv:
            if self._closed:
                raise RuntimeError(f"{self.name}: the decoder is closed")
            self._pending.append(job)
            self._cv.notify()
        return job.future

    def submit_group(self, requests: Sequence[tuple[Sequence[int], DecodeParams]]) -> list[concurrent.futures.Future]:
        """Queue requests that decode as one batch of their own, in order, with no other request in it.

        The group waits until the running batch has ended, then its requests are prefilled one by one
        and join the batch at the same step; nothing else is admitted until its last row ends.  So a
        group of seeded requests decodes under the same company every time it is sent, and returns the
        same tokens (a request alone is a group of one).  A group wider than ``max_rows`` decodes in
        consecutive chunks of whole requests, in order; a request wider than that runs alone.
        """
        jobs = []
        for prompt_ids, params in requests:
            if not prompt_ids:
                raise ValueError("decode needs at least one prompt token")
            jobs.append(_Job(list(prompt_ids), params, None, None, concurrent.futures.Future()))
        if jobs:
            with self._cv:
                if self._closed:
                    raise RuntimeError(f"{self.name}: the decoder is closed")
                self._pending.append(_Group(jobs))
                self._cv.notify()
        return [j.future for j in jobs]

    def start(self) -> "BatchDecoder":
        """Decode on a background thread (named after the decoder) from now until :meth:`close`."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the background thread; requests still queued or running fail with RuntimeError."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def run(self) -> None:
        """Decode on the calling thread until no request is queued or running."""
        while self._tick():
            pass

    # -- the decoding thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._rows and not self._closed:
                    self._cv.wait()
                if self._closed:
                    break
            self._tick()
        err = Unavailable(f"{self.name}: the policy version this request was decoding on was freed before it finished "
                          "(replaced by a newer version, and still busy after the scorer's drain_timeout_s, or the "
                          "scorer is stopping); retry the request, or raise drain_timeout_s above the longest request")
        self._fail(self._running_jobs() + _jobs_of(self._pending), err)
        self._reset()
        self._pending.clear()

    def _tick(self) -> bool:
        """Admit what fits, then one decode step. False when there was nothing to do."""
        admitted = self._take_pending()
        with torch.inference_mode():
            for k, job in enumerate(admitted):
                self._admit(job)
                if self._exclusive and self._solo and k + 1 < len(admitted):
                    # The first prefill found a cache that cannot be merged: the group goes on one at a time.
                    with self._cv:
                        self._pending.appendleft(_Group(admitted[k + 1:]))
                    break
            if self._rows:
                self._step()
        return bool(admitted or self._rows or self._pending)

    def _take_pending(self) -> list[_Job]:
        out: list[_Job] = []
        with self._cv:
            if self._exclusive and self._rows:
                return out  # a group decodes with no company
            self._exclusive = False
            room = self.max_rows - len(self._rows)
            if self._pending and isinstance(self._pending[0], _Group):
                if self._rows:
                    return out  # the group waits for the running batch to end
                group = self._pending.popleft()
                take, rows = 1, group.jobs[0].width  # whole requests up to max_rows, at least one
                while not self._solo and take < len(group.jobs) and rows + group.jobs[take].width <= self.max_rows:
                    rows += group.jobs[take].width
                    take += 1
                if take < len(group.jobs):
                    self._pending.appendleft(_Group(group.jobs[take:]))
                self._exclusive = True
                return group.jobs[:take]
            while self._pending:
                job = self._pending[0]
                if isinstance(job, _Group):
                    break
                alone = not self._rows and not out
                if not alone and (self._solo or not self._cache_checked or job.width > room):
                    break
                out.append(self._pending.popleft())
                room -= job.width
                if self._solo or not self._cache_checked:
                    break
        return out

    def _admit(self, job: _Job) -> None:
        """Prefill one request on its own and add its rows to the running batch."""
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            p = job.params
            job.generator = torch.Generator(device=self.device)
            if p.seed is not None:
                job.generator.manual_seed(int(p.seed))
            else:
                job.generator.seed()
            job.rows = [Completion(i) for i in range(job.width)]
            if p.max_tokens <= 0:
                self._finish(job)
                return
            ids = torch.tensor([job.prompt_ids] * job.width, dtype=torch.long, device=self.device)  # (R, P)
            out = self.model(input_ids=ids, use_cache=True)
            logits = out.logits[:, -1, :].float()  # (R, V)
            cache = out.past_key_values
            if not self._cache_checked:
                self._cache_checked = True
                if not self._solo and not _mergeable(cache):
                    self._solo = True
                    log.info("%s: this model's KV cache cannot be merged; decoding one request at a time", self.name)
            keep = self._append(job, job.rows, self._choose(job, logits))
            if not keep:
                self._finish(job)
                return
            mask = torch.ones(job.width, ids.shape[1], dtype=torch.long, device=self.device)
            pos = torch.full((job.width,), ids.shape[1], dtype=torch.long, device=self.device)
            last = torch.tensor([r.token_ids[-1] for r in job.rows], dtype=torch.long, device=self.device)
            cache, mask, pos, last = _select(cache, mask, pos, last, keep, job.width)
            self._join(job, [job.rows[i] for i in keep], cache, mask, pos, last)
        except Exception as e:  # noqa: BLE001 - this request fails; the batch goes on
            log.warning("%s: prefill failed", self.name, exc_info=True)
            if not job.future.done():
                job.future.set_exception(e)

    def _join(self, job: _Job, rows: list[Completion], cache: Any, mask: torch.Tensor, pos: torch.Tensor,
              last: torch.Tensor) -> None:
        if not self._rows:
            self._rows = [(job, r) for r in rows]
            self._cache, self._mask, self._pos, self._last = cache, mask, pos, last
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for a, b in zip(self._cache.layers, cache.layers):
            layers.append((torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)]),
                           torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)])))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._pos = torch.cat([self._pos, pos])
        self._last = torch.cat([self._last, last])
        self._rows += [(job, r) for r in rows]

    def _step(self) -> None:
        jobs: dict[int, tuple[_Job, list[int]]] = {}
        for i, (job, _) in enumerate(self._rows):
            jobs.setdefault(id(job), (job, []))[1].append(i)
        try:
            for job, idx in list(jobs.values()):  # a cancelled request ends as if max_tokens had been reached
                if job.cancelled is not None and job.cancelled():
                    for i in idx:
                        self._rows[i][1].finish_reason = self._rows[i][1].finish_reason or LENGTH
                    del jobs[id(job)]
            keep: list[int] = []
            live = [i for _, idx in jobs.values() for i in idx]
            if live:
                self.peak_rows = max(self.peak_rows, len(self._rows))
                mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
                out = self.model(input_ids=self._last[:, None], attention_mask=mask, position_ids=self._pos[:, None],
                                 past_key_values=self._cache, use_cache=True)
                self._cache, self._mask, self._pos = out.past_key_values, mask, self._pos + 1
                logits = out.logits[:, -1, :].float()  # (B, V)
                last = self._last.clone()
                for job, idx in jobs.values():
                    tokens = self._choose(job, logits[idx])
                    kept = self._append(job, [self._rows[i][1] for i in idx], tokens)
                    keep += [idx[k] for k in kept]
                    last[idx] = torch.tensor(tokens, dtype=torch.long, device=self.device)
                self._last = last
        except Exception as e:  # noqa: BLE001 - every request in the batch fails, the decoder goes on
            log.warning("%s: decode step failed", self.name, exc_info=True)
            self._fail(self._running_jobs(), e)
            self._reset()
            return
        ended = {id(j): j for j, r in self._rows if r.finish_reason is not None}
        if len(keep) < len(self._rows):
            keep.sort()
            self._cache, self._mask, self._pos, self._last = _select(self._cache, self._mask, self._pos, self._last,
                                                                      keep, len(self._rows))
            self._rows = [self._rows[i] for i in keep]
            if not self._rows:
                self._reset()
        running = {id(j) for j, _ in self._rows}
        for key, job in ended.items():
            if key not in running:
                self._finish(job)

    def _choose(self, job: _Job, logits: torch.Tensor) -> list[int]:
        """The next token of each of ``job``'s rows, from their last logits (R, V)."""
        p = job.params
        if p.greedy:
            return torch.argmax(logits, dim=-1).tolist()
        filtered = nucleus_filter(logits / p.temperature, p.top_p)
        return torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=job.generator).squeeze(-1).tolist()

    def _append(self, job: _Job, rows: Sequence[Completion], tokens: Sequence[int]) -> list[int]:
        """Append each row's token, decode its text, stream what became final; the rows still running."""
        p = job.params
        running = []
        for k, (row, token) in enumerate(zip(rows, tokens)):
            row.token_ids.append(int(token))
            is_eos = int(token) in self.eos  # counted as generated, never shown
            last = len(row.token_ids) >= p.max_tokens
            shown = len(row.token_ids) - int(is_eos)
            delta = _advance(row, self.tokenizer, p.stop, is_eos or last, shown)
            if row.finish_reason is None and (is_eos or last):
                row.finish_reason = STOP if is_eos else LENGTH
            if delta and job.on_delta is not None:
                # Greedy rows are one row shown n times.
                for index in range(p.n) if p.greedy else (row.index,):
                    job.on_delta(index, delta)
            if row.finish_reason is None:
                running.append(k)
        return running

    def _finish(self, job: _Job) -> None:
        done = job.rows
        for row in done:
            if row.finish_reason is None:
                row.finish_reason = LENGTH
        if job.params.greedy and job.params.n > 1:
            only = done[0]
            done = [Completion(i, list(only.token_ids), only.text, only.emitted, only.finish_reason)
                    for i in range(job.params.n)]
        if not job.future.done():
            job.future.set_result(Decoded(tuple(done), len(job.prompt_ids)))

    def _fail(self, jobs: Sequence[_Job], err: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                if job.future.running() or job.future.set_running_or_notify_cancel():
                    job.future.set_exception(err)

    def _running_jobs(self) -> list[_Job]:
        """The requests with rows in the running batch, once each, in batch order."""
        return list({id(j): j for j, _ in self._rows}.values())

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None


def _mergeable(cache: Any) -> bool:
    """Whether ``cache`` is plain per-layer keys and values (what :class:`BatchDecoder` pads and joins)."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (B, ..., T, D) or a mask (B, T) padded with zeros on the left of its sequence axis to ``width``."""
    axis = 1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _select(cache: Any, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor, keep: Sequence[int],
            rows: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch reduced to the rows ``keep`` (of ``rows``), with columns that became all padding dropped."""
    if len(keep) == rows:
        return cache, mask, pos, last
    idx = torch.tensor(list(keep), dtype=torch.long, device=mask.device)
    cache.batch_select_indices(idx)
    mask, pos, last = mask[idx], pos[idx], last[idx]
    if len(keep):
        first = int(mask.any(dim=0).nonzero()[0])
        if first > 0:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            mask = mask[:, first:]
    return cache, mask, pos, last


def decode(
    hf_model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    params: DecodeParams,
    *,
    on_delta: OnDelta | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Decoded:
    """Sample ``params.n`` completions of one tokenized prompt, alone (blocking; call off the event loop).

    ``on_delta`` is called from this thread as text becomes final; ``cancelled()`` is polled every
    step and ends decoding early (the client went away).
    """
    decoder = BatchDecoder(hf_model, tokenizer, max_rows=max(1, 1 if params.greedy else params.n))
    future = decoder.submit(prompt_ids, params, on_delta=on_delta, cancelled=cancelled)
    decoder.run()
    return future.result()


__all__ = ["BatchDecoder", "Completion", "DecodeParams", "Decoded", "LENGTH", "STOP", "decode", "first_stop", "held_back",
           "nucleus_filter"]
