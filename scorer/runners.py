"""Loading checkpoints into runnable form: verify, load, warm up; then tokenize and forward in batches.

Why it exists: the engine deals in "runners" (tokenize a request; score a batch of already-tokenized
rows from many requests; generate) so that it never touches torch.  This module adapts the shared
:class:`services.reward_model.RewardModel` and :class:`services.policy_model.PolicyModel` to that:

* tokenization happens per request, off the event loop, with the model's own ``encode`` (the same
  truncation and formatting as training and offline scoring); rows are kept unpadded;
* a batch of rows from different requests is right-padded to its longest row and run under
  ``torch.inference_mode`` on the model thread; logit 0 is the reward, logits 1.. the attributes;
* :func:`open_published` opens a published checkpoint's URI and verifies its manifest checksums
  (:func:`services.checkpoints.open_checkpoint`, as the trainer does), turning what is wrong into a
  :class:`CheckpointRefused` reason; the warm-up refuses weights that produce non-finite scores.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from scorer.decoding import BatchDecoder, DecodeParams
from scorer.fastpath import apply_cpu_fast_path
from scorer.precision import cast_for_serving, resolve_dtype
from services.schemas import ChatMessage

log = logging.getLogger(__name__)

#: Seed for the head of a bare backbone served as "base", so every scorer process serves the same
#: (untrained) model and scores are reproducible across restarts.
BASE_HEAD_SEED = 0


#: Why ``close`` never calls ``gc.collect()``: a loaded model holds no reference cycle, so dropping the
#: last reference frees its tensors at once (tested in tests/unit/test_scorer_reload.py); a full
#: collection over a serving process's ~450k objects holds the GIL for ~0.2 s on the 2-core dev box,
#: which stalled every request in flight during a hot swap (the chaos bench's p99 113 -> 347 ms).


class CheckpointRefused(Exception):
    """A checkpoint that must not be served; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotReloadable(Exception):
    """A checkpoint whose weights cannot be copied into an already-built model (another architecture,
    tokenizer or spec, or a different set of tensors): it needs a full load.  Nothing is wrong with it."""


#: A Hugging Face model folder's weights: one file, or shards listed by an index.
_WEIGHTS_FILE, _WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a model folder's weights (not, e.g., a trainer's live weights)."""
    root = Path(path)
    if (root / _WEIGHTS_INDEX).is_file():
        return [root / f for f in sorted(set(json.loads((root / _WEIGHTS_INDEX).read_text())["weight_map"].values()))]
    return [root / _WEIGHTS_FILE] if (root / _WEIGHTS_FILE).is_file() else []


def checkpoint_signature(path: str | os.PathLike) -> str:
    """A hash of every file of a model folder except its weights, the checkpoint manifest and the
    trainer's per-checkpoint state (services.checkpoints.TRAINING_STATE_FILES): equal signatures mean
    the same architecture, tokenizer and spec."""
    import hashlib

    from services.checkpoints import MANIFEST, TRAINING_STATE_FILES

    root = Path(path)
    skip = {MANIFEST, *TRAINING_STATE_FILES, *(f.name for f in weight_files(root))}
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel in skip:
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def load_weights_in_place(hf_model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Copy a folder's safetensors weights into ``hf_model``'s existing tensors (cast to their dtypes),
    with no module construction; returns how many tensors were copied.

    Every saved tensor must name a tensor of the model with the same shape, and every tensor of the
    model must be saved or tied to a saved one, else NotReloadable, raised before anything is copied.
    The copy bumps each tensor's version counter, so scorer/fastpath.py re-packs its weights on the
    next forward (the warm-up).
    """
    from safetensors.torch import load_file

    files = weight_files(path)
    if not files:
        raise NotReloadable(f"{path} has no {_WEIGHTS_FILE} (or shards listed in {_WEIGHTS_INDEX})")
    saved: dict[str, torch.Tensor] = {}
    for f in files:
        saved.update(load_file(str(f)))
    targets = hf_model.state_dict(keep_vars=True)
    unknown = sorted(set(saved) - set(targets))
    if unknown:
        raise NotReloadable(f"saved tensors the built model does not have: {', '.join(unknown[:5])}")
    bad = [k for k, v in saved.items() if tuple(v.shape) != tuple(targets[k].shape)]
    if bad:
        raise NotReloadable(f"tensors with another shape: {', '.join(bad[:5])}")
    covered = {targets[k].data_ptr() for k in saved}
    missing = sorted(k for k, t in targets.items() if k not in saved and t.data_ptr() not in covered)
    if missing:
        raise NotReloadable(f"tensors of the built model the checkpoint does not save: {', '.join(missing[:5])}")
    with torch.no_grad():
        for k, v in saved.items():
            targets[k].copy_(v)
    return len(saved)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointRefused("no_cuda", f"device {device!r} requested but CUDA is not available; use device=cpu")
    return torch.device(device)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan_workers(device: str, infer_workers: int, torch_threads: int) -> tuple[int, int]:
    """(inference workers, intra-op threads each).

    On CPU the default is one single-threaded worker per core: two independent single-threaded
    forwards keep both cores busy through the non-GEMM ops and never wait at an OpenMP barrier when
    the gRPC loop or the tokenizer briefly takes a core; measured ~10% more sequences/s than one
    batch over two threads on the 2-core dev box.  On GPU one worker feeds the device.
    """
    dev = resolve_device(device) if device != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = cpu_cores()
    workers = infer_workers or (1 if dev.type == "cuda" else cores)
    threads = torch_threads or max(1, cores // workers)
    return workers, threads


def configure_torch_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per core); inter-op 1.  Returns the count in effect."""
    torch.set_num_threads(max(1, threads or cpu_cores()))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return torch.get_num_threads()


def open_published(uri: str) -> str:
    """The verified local directory of a published checkpoint's URI, or CheckpointRefused.

    Reasons: ``unsupported_uri`` (a scheme this scorer cannot open), ``corrupt`` (no manifest, a
    missing or extra file, a checksum mismatch, or no directory at all).
    """
    from services.checkpoints import CorruptCheckpointError, open_checkpoint
    from services.errors import InvalidArgument

    try:
        return str(open_checkpoint(uri))
    except InvalidArgument as e:
        raise CheckpointRefused("unsupported_uri", str(e)) from e
    except CorruptCheckpointError as e:
        raise CheckpointRefused("corrupt", str(e)) from e


@dataclass(frozen=True)
class Row:
    """One tokenized (prompt, response) pair, unpadded: (T,) ids and optional (T,) type ids."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class RewardRunner:
    """A loaded RewardModel: ``encode`` per request, ``run_batch`` over rows of many requests."""

    def __init__(self, model: Any) -> None:
        self.model = model
        #: the dtype the backbone runs in (the head is fp32 either way, see scorer/precision.py)
        self.dtype: str = str(model.spec.dtype)
        self.attribute_names: tuple[str, ...] = tuple(model.spec.attributes)
        self.pad_id: int = int(model.tokenizer.pad_token_id)
        self.max_length: int = int(model.spec.max_length)
        #: whether the forward runs scorer/fastpath.py's CPU bf16 path (set by :func:`load_reward`)
        self.cpu_fast_path: bool = False
        #: :func:`checkpoint_signature` of the folder it was loaded from ("" = not reloadable)
        self.signature: str = ""

    def reload(self, path: str, *, warmup: bool, timings: dict[str, float] | None = None) -> "RewardRunner":
        """Serve another checkpoint of the same model by copying its weights into this one (a retired
        copy: nothing may be using it).  NotReloadable when it needs a full load; CheckpointRefused
        when its weights fail the warm-up (this copy is then unusable: close it)."""
        t0 = time.perf_counter()
        if not self.signature or checkpoint_signature(path) != self.signature:
            raise NotReloadable(f"{path}: its config, tokenizer or spec differ from the built model's")
        load_weights_in_place(self.model.hf_model, path)
        t1 = time.perf_counter()
        if warmup:
            self.warmup()
        if timings is not None:
            timings.update(load=t1 - t0, warmup=time.perf_counter() - t1)
        return self

    def encode(self, prompt: Sequence[ChatMessage], responses: Sequence[str]) -> list[Row]:
        batch = self.model.encode([list(prompt)] * len(responses), list(responses))
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
        types = batch.get("token_type_ids")
        rows = []
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            rows.append(Row(ids[i, :n].clone(), types[i, :n].clone() if types is not None else None))
        return rows

    def collate(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        types = torch.zeros((len(rows), width), dtype=torch.long) if rows[0].token_type_ids is not None else None
        for i, r in enumerate(rows):
            n = len(r)
            ids[i, :n] = r.input_ids
            mask[i, :n] = 1
            if types is not None:
                types[i, :n] = r.token_type_ids
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["token_type_ids"] = types
        return out

    def run_batch(self, rows: list[Row]) -> list[tuple[float, dict[str, float]]]:
        batch = self.collate(rows)
        with torch.inference_mode():
            out = self.model(batch)
            rewards = out.rewards.float().cpu().tolist()  # (B,)
            attrs = out.attributes.float().cpu().tolist() if out.attributes is not None else None  # (B, A)
        return [
            (rewards[i], dict(zip(self.attribute_names, attrs[i])) if attrs is not None else {})
            for i in range(len(rows))
        ]

    def warmup(self) -> None:
        """One forward on a short and one on a max-length row; refuse weights giving non-finite scores."""
        from services.schemas import ChatMessage as CM

        prompt = [CM("user", "How do I boil an egg?")]
        rows = self.encode(prompt, ["Put it in boiling water for nine minutes.", "word " * (self.max_length * 2)])
        for reward, attrs in self.run_batch(rows):
            if not math.isfinite(reward) or not all(math.isfinite(v) for v in attrs.values()):
                raise CheckpointRefused("nonfinite", "warm-up produced non-finite scores; the weights are broken")

    def close(self) -> None:
        device = self.model.device
        del self.model  # freed by reference counting (see the note above CheckpointRefused)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def load_reward(path: str, *, device: str, dtype: str, warmup: bool,
                max_length: int | None = None, cpu_fast_path: bool = True,
                timings: dict[str, float] | None = None) -> RewardRunner:
    """Load and warm up a reward model from a local directory.  Blocking: run off the loop.

    A published checkpoint's directory comes from :func:`open_published`, which verified it.

    ``cpu_fast_path``: serve a bf16 BERT encoder on CPU with scorer/fastpath.py's forward (other
    models, dtypes and devices keep the stock one either way).
    """
    from services.reward_model import RewardModel

    t0 = time.perf_counter()
    dev = resolve_device(device)
    serving = resolve_dtype(dtype, dev)
    if not Path(path).exists():
        raise CheckpointRefused("missing", f"model path {path} does not exist")
    try:
        # A bare backbone gets a fresh head: seed it so "base" is the same model in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BASE_HEAD_SEED)
            # Loaded in fp32 (on the CPU) and cast here, so a half-precision model keeps an exact fp32 head.
            model = RewardModel.from_pretrained(path, dtype="float32", max_length=max_length)
        cast_for_serving(model.hf_model, serving)
        model.spec = dataclasses.replace(model.spec, dtype=serving)
        model.to(dev)
    except Exception as e:  # noqa: BLE001 - any load failure refuses the checkpoint; the cause is logged
        log.warning("loading reward model %s failed", path, exc_info=True)
        raise CheckpointRefused("load_failed", f"could not load reward model from {path}: {type(e).__name__}: {e}") from e
    model.eval()
    runner = RewardRunner(model)
    runner.cpu_fast_path = cpu_fast_path and apply_cpu_fast_path(model.hf_model)
    runner.signature = checkpoint_signature(path)
    t1 = time.perf_counter()
    if warmup:
        runner.warmup()
    if timings is not None:
        timings.update(load=t1 - t0, warmup=time.perf_counter() - t1)
    return runner


class PolicyRunner:
    """A loaded causal-LM policy: ``sample`` completions through its batch decoder (scorer/decoding.py).

    ``batch_rows``: the most completion rows decoded together across concurrent requests (1 = one
    request at a time).  The decoder's thread starts with the runner and stops at :meth:`close`.
    """

    def __init__(self, model: Any, *, batch_rows: int = 1, name: str = "decode") -> None:
        self.model = model
        self.dtype: str = str(model.spec.dtype)
        self.decoder = BatchDecoder(model.hf_model, model.tokenizer, max_rows=batch_rows, name=name).start()

    def prompt_ids(self, prompt: Sequence[ChatMessage]) -> list[int]:
        """The prompt through the policy's chat template (the engine's tokenize thread)."""
        return list(self.model.prompt_ids(list(prompt)))

    def submit(self, prompt_ids: Sequence[int], params: Any, on_delta: Any = None,
               cancelled: Any = None) -> concurrent.futures.Future:
        """Queue one request on the batch decoder (``params`` a DecodeParams); the future gives its Decoded."""
        return self.decoder.submit(prompt_ids, params, on_delta=on_delta, cancelled=cancelled)

    def submit_group(self, requests: Sequence[tuple[Sequence[int], Any]]) -> list[concurrent.futures.Future]:
        """Queue requests that decode as one batch of their own, in order (GenerateBatch)."""
        return self.decoder.submit_group(requests)

    def yes_probability(self, conversations: Sequence[Sequence[ChatMessage]]) -> list[float]:
        """A judge's P(yes) after each conversation (the engine's judge thread)."""
        return self.model.yes_probability(conversations)

    def warmup(self) -> None:
        """Two greedy tokens through the same decoder that serves, so a version that cannot decode is refused."""
        params = DecodeParams(n=1, temperature=0.0, top_p=1.0, max_tokens=2, seed=0)
        out = self.submit(self.prompt_ids([ChatMessage("user", "Hi")]), params).result()
        if len(out.completions) != 1:
            raise CheckpointRefused("warmup_failed", f"policy warm-up returned {len(out.completions)} completions for n=1")

    def close(self) -> None:
        self.decoder.close()
        del self.decoder
        del self.model  # freed by reference counting, as a reward model is
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_policy(path: str | None, *, device: str, dtype: str, warmup: bool, batch_rows: int = 1,
                name: str = "decode") -> PolicyRunner:
    """Load and warm up a policy (a directory from :func:`open_published`, or None = the embedded SmolLM2);
    ``batch_rows`` and ``name`` (its decoder thread's) as :class:`PolicyRunner` takes them."""
    from services.policy_model import PolicyModel

    dev = resolve_device(device)
    try:
        model = PolicyModel.from_pretrained(path, device=dev, dtype=resolve_dtype(dtype, dev))
    except Exception as e:  # noqa: BLE001
        log.warning("loading policy %s failed", path, exc_info=True)
        raise CheckpointRefused("load_failed", f"could not load policy from {path or 'the embedded SmolLM2'}: "
                                f"{type(e).__name__}: {e}") from e
    runner = PolicyRunner(model, batch_rows=batch_rows, name=name)
    if warmup:
        try:
            runner.warmup()
        except BaseException:
            runner.close()  # a refused version keeps no decoder thread (nor, through it, its weights)
            raise
    return runner


__all__ = [
    "CheckpointRefused", "NotReloadable", "PolicyRunner", "RewardRunner", "Row", "checkpoint_signature",
    "configure_torch_threads", "load_policy", "load_reward", "load_weights_in_place", "open_published",
    "resolve_device", "resolve_dtype", "weight_files",
]
