"""The trainable policy the continual DPO objective optimises: a causal LM with a LoRA (or fully trained).

The DPO losses need, for every (prompt, response) row, the summed log-probability of the response
tokens under the policy (with gradient) and under a frozen reference.  This module owns everything
between records and those two numbers: formatting the prompt exactly as serving does (the policy's
chat template via :class:`services.policy_model.PolicyModel`, the prompt cut from the left), marking
the response tokens, running length-sorted sub-batches through the model, and saving what the
scorer loads.

The reference is the base model.  With LoRA it is the *same* model with its adapter switched off
(peft's ``disable_adapter()``), so training holds one copy of the weights.  Full fine-tuning has no
such switch and keeps a frozen copy of the base, doubling the weight memory.

A policy given as GGUF (the embedded SmolLM2) is first converted once to a plain HF folder by
:func:`services.policy_model.ensure_plain_checkpoint`: peft refuses a model transformers loaded
from GGUF, because it stays marked as quantized.

Rows that can never be trained on (an empty response, or one that alone fills ``max_length``) are
refused with :class:`RejectedResponses`, which lists every bad row with its reason; the trainer
checks first with :meth:`TrainablePolicy.rejections` and sends those records to the dead-letter
topic instead of failing the batch.

How a resumed trainer rebuilds: ``save_adapter(dir)`` writes the peft adapter and
``prefstream_policy_lm.json`` (the spec: base folder, LoRA settings, budgets); ``from_checkpoint(dir)``
loads the plain base folder named there and puts the adapter back on it, trainable.  A fully
fine-tuned policy resumes from its ``save_merged`` folder, with the base recorded in the same file
as its reference.  Optimiser state is the trainer's to save.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from services.errors import InvalidArgument
from services.policy_model import SPEC_FILE, PolicyModel, PolicySpec, SamplingParams, ensure_plain_checkpoint
from services.reward_model import DTYPES, resolve_model_path, role_content
from trainer.dpo_losses import mean_token_kl, packed_token_logps

log = logging.getLogger(__name__)

#: Written beside adapters and merged folders: how to rebuild the trainable policy.
TRAIN_SPEC_FILE = "prefstream_policy_lm.json"
ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# Settings.


@dataclass(frozen=True)
class LoraSettings:
    """The low-rank adapter (Hu et al. 2021): ``W + (alpha / rank) · B A`` on the named linear layers."""

    rank: int = field(default=16, metadata={"help": "rank r of the update B A"})
    alpha: float = field(default=32.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input while training"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
        metadata={"help": "names (last path component) of the linear layers that get an adapter"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.rank < 1:
            raise InvalidArgument("lora_rank", f"must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise InvalidArgument("lora_alpha", f"must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument("lora_dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise InvalidArgument("lora_target_modules",
                                  f"give at least one module name, got {list(self.target_modules)}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class PolicyTrainingSpec:
    """What a trainable policy is; saved beside every checkpoint and rebuilt from."""

    base_model: str = field(metadata={"help": "plain HF causal-LM folder (GGUF is converted first)"})
    lora: LoraSettings | None = field(default_factory=LoraSettings,
                                      metadata={"help": "adapter settings; None = full fine-tuning"})
    dtype: str = field(default="float32", metadata={"help": "weight dtype: float32, bfloat16 or float16"})
    max_length: int = field(default=1024, metadata={"help": "prompt + response tokens per row"})
    max_prompt_tokens: int = field(default=1024, metadata={
        "help": "prompt tokens kept (newest), as the scorer's PolicySpec.max_prompt_tokens"})
    max_tokens_per_forward: int = field(default=8192, metadata={
        "help": "rows x padded length per model call; longer batches run as length-sorted sub-batches"})
    max_response_tokens: int = field(default=2048, metadata={
        "help": "a response over this many tokens is refused (dead-lettered); shorter ones that do not fit "
                "max_length are cut"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.max_length < 2:
            raise InvalidArgument("max_length", f"must be at least 2 (a prompt token and a response token), "
                                  f"got {self.max_length}")
        if self.max_prompt_tokens < 8:  # the scorer's PolicySpec floor: both must cut prompts alike
            raise InvalidArgument("max_prompt_tokens", f"must be at least 8, got {self.max_prompt_tokens}")
        if self.max_tokens_per_forward < self.max_length:
            raise InvalidArgument("max_tokens_per_forward", f"{self.max_tokens_per_forward} cannot hold one row "
                                  f"of max_length={self.max_length}; raise it or lower max_length")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"] = self.lora.to_dict() if self.lora is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PolicyTrainingSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("lora") is not None:
            values["lora"] = LoraSettings(**values["lora"])
        return cls(**values)


def check_lora_targets(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Refuse adapter targets the model does not have, listing the linear layers it does have."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in target_modules if t not in linear]
    if missing:
        raise InvalidArgument("lora_target_modules", f"{', '.join(missing)} not in the model; linear modules it "
                              f"has: {', '.join(linear)}")


# ---------------------------------------------------------------------------------------------
# Batches.


class RejectedResponses(InvalidArgument):
    """Rows that can never be trained on; ``reasons`` maps each row index to why.

    The trainer sends these records to the dead-letter topic (use :meth:`TrainablePolicy.rejections`
    to find them before encoding), so one bad record does not fail a batch.
    """

    def __init__(self, reasons: Mapping[int, str]) -> None:
        self.reasons = dict(reasons)
        listed = "; ".join(f"row {i}: {r}" for i, r in sorted(self.reasons.items())[:5])
        more = f" (and {len(self.reasons) - 5} more)" if len(self.reasons) > 5 else ""
        super().__init__("responses", f"{listed}{more}; drop these rows (dead-letter them) and encode the rest")


@dataclass(frozen=True)
class PolicyBatch:
    """Right-padded rows ``prompt + response`` and which tokens are the response."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    response_mask: torch.Tensor  # (B, T) bool, True on response tokens (the ones scored)
    prompt_truncated: int = 0  # rows whose prompt lost its oldest tokens

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_tokens(self) -> torch.Tensor:
        """Scored tokens per row (the per-token normalisation of IPO-style losses). # (B,)"""
        return self.response_mask.sum(-1)

    def to(self, device: torch.device | str) -> "PolicyBatch":
        return dataclasses.replace(self, input_ids=self.input_ids.to(device),
                                   attention_mask=self.attention_mask.to(device),
                                   response_mask=self.response_mask.to(device))


def sub_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices, longest first, grouped so that rows x longest row stays within ``max_tokens``.

    A row longer than ``max_tokens`` runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class SequenceLogps(nn.Module):
    """``forward(batch tensors) -> (sum_logps (B,), n_tokens (B,), stop_logps (B, T) | None)``: the unit DDP wraps.

    All sub-batches run inside one ``forward``, because DDP arms its gradient hooks once per call.
    The model projects to the vocabulary only at the positions that predict a response token
    (``logits_to_keep``): the prompt's positions never reach the LM head nor the ``log_softmax``, which
    on a 49k vocabulary are most of a small model's activation memory.  A model without
    ``logits_to_keep`` falls back to full logits.  ``temperature``: the log-probs are those of
    ``softmax(logits / temperature)`` (:func:`trainer.dpo_losses.sequence_logps`).  ``stop_token``: when
    set, the third output holds the log-probability of that token at every position that predicts a
    response token (position t predicts token t + 1; 0 elsewhere), for
    :func:`trainer.dpo_losses.stop_anchor_loss`; None otherwise.
    """

    def __init__(self, model: nn.Module, max_tokens_per_forward: int, temperature: float = 1.0,
                 stop_token: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.max_tokens_per_forward = max_tokens_per_forward
        self.temperature = temperature
        self.stop_token = stop_token
        self._packed = True

    def _rows(self, ids: torch.Tensor, att: torch.Tensor, resp: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed response-token log-probs of one length group ``(b,)``, and the stop token's log-prob at
        its ``predicting`` positions, packed in row-major order ``(M,)`` (None without a stop token).
        ids, att, resp: (b, t)"""
        keep = predicting(resp)
        if self._packed:
            logits = packed_logits(self.model, ids, att, keep)
            if logits is None:
                self._packed = False
        if not self._packed:
            logits = self.model(input_ids=ids, attention_mask=att).logits[keep]  # (M, V)
        labels = ids[:, 1:][resp[:, 1:]]  # (M,) in the row-major order of keep
        tokens, stop = packed_token_logps(logits, labels, self.temperature, self.stop_token)
        rows = keep.nonzero()[:, 0]  # (M,)
        return torch.zeros(ids.shape[0], dtype=tokens.dtype, device=tokens.device).index_add(0, rows, tokens), stop

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lengths = attention_mask.sum(-1).tolist()  # (B,)
        response_mask = response_mask.bool()
        keep = predicting(response_mask)  # (B, T)
        sums, order, stops = [], [], []
        for rows in sub_batches(lengths, self.max_tokens_per_forward):
            idx = torch.tensor(rows, device=input_ids.device)
            width = int(lengths[rows[0]])  # right-padded: the longest row's length covers the group
            total, stop = self._rows(input_ids[idx, :width], attention_mask[idx, :width], response_mask[idx, :width])
            sums.append(total)
            order.extend(rows)
            if stop is not None:
                at = keep[idx, :width].nonzero()  # (M, 2): row in the group, position
                stops.append((idx[at[:, 0]], at[:, 1], stop))
        inverse = torch.empty(len(order), dtype=torch.long, device=input_ids.device)
        inverse[torch.tensor(order, device=input_ids.device)] = torch.arange(len(order), device=input_ids.device)
        counts = response_mask[:, 1:].sum(-1).to(sums[0].dtype)  # (B,) the first token has no prediction
        stop_logps = None
        if self.stop_token is not None:
            stop_logps = torch.zeros(input_ids.shape, dtype=sums[0].dtype, device=input_ids.device)  # (B, T)
            for r, t, v in stops:
                stop_logps = stop_logps.index_put((r, t), v)
        return torch.cat(sums)[inverse], counts, stop_logps  # (B,), (B,), (B, T) | None in the batch's order


def predicting(resp: torch.Tensor) -> torch.Tensor:
    """The positions whose logits predict a response token (position t predicts token t + 1). (b, t) -> (b, t)"""
    keep = torch.zeros_like(resp, dtype=torch.bool)
    keep[:, :-1] = resp[:, 1:]
    return keep


def packed_logits(model: nn.Module, ids: torch.Tensor, att: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """The model's logits at the ``keep`` positions only, packed in row-major order ``# (M, V)``, or None for
    an architecture without ``logits_to_keep`` (the caller then takes the full logits)."""
    try:
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
    except TypeError:
        return None
    return logits.reshape(int(keep.sum()), -1)


def _reply_logits(model: nn.Module, ids: torch.Tensor, att: torch.Tensor,
                  keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict reply tokens and the mask that selects them, for :func:`mean_token_kl`: packed
    as one row ``(1, M, V)`` with an all-true mask, or, for an architecture without ``logits_to_keep``, the full
    ``(b, t-1, V)`` with ``keep``'s positions.  Packed, the prompt's positions never reach the LM head nor the
    softmaxes (on 48 guard rows of 43% prompt tokens, the KL took 22% less time)."""
    packed = packed_logits(model, ids, att, keep)
    if packed is not None:
        return packed[None], torch.ones(1, packed.shape[0], dtype=torch.bool, device=packed.device)
    return model(input_ids=ids, attention_mask=att).logits[:, :-1], keep[:, :-1]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# ---------------------------------------------------------------------------------------------
# The policy.


class TrainablePolicy:
    """A causal LM the DPO objective trains, with its tokenizer, its reference and serving's formatting."""

    def __init__(self, model: nn.Module, tokenizer: Any, spec: PolicyTrainingSpec,
                 reference: nn.Module | None = None) -> None:
        """``model``: a peft model when ``spec.lora`` is set, else the HF model; ``reference``: the frozen
        copy full fine-tuning needs (made here when not given)."""
        self.spec = spec
        self.tokenizer = tokenizer
        self.model = model
        if spec.lora is None:
            reference = reference if reference is not None else copy.deepcopy(model)
            reference.requires_grad_(False)
            reference.eval()
        self._reference = reference
        self._logps = SequenceLogps(model, spec.max_tokens_per_forward)
        self._call: nn.Module = self._logps
        # Serving's own formatting and sampling, over the live (adapter-on) model.
        self._serving = PolicyModel(model, tokenizer, PolicySpec(
            base_model=spec.base_model, dtype=spec.dtype, max_prompt_tokens=spec.max_prompt_tokens))

    @property
    def logit_temperature(self) -> float:
        """The temperature :meth:`logps` and :meth:`reference_logps` read log-probs at (1 = the model's own)."""
        return self._logps.temperature

    @logit_temperature.setter
    def logit_temperature(self, value: float) -> None:
        if not value > 0:
            raise InvalidArgument("temperature", f"must be > 0, got {value}")
        self._logps.temperature = float(value)

    @property
    def _chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base_model: str | os.PathLike | None = None, *, lora: LoraSettings | None = LoraSettings(),
                  dtype: str = "float32", device: str | torch.device | None = None, max_length: int = 1024,
                  max_prompt_tokens: int = 1024, max_tokens_per_forward: int = 8192, max_response_tokens: int = 2048,
                  cache_dir: str | os.PathLike | None = None) -> "TrainablePolicy":
        """A fresh policy on ``base_model`` (an HF folder or a GGUF, converted once into ``cache_dir``)."""
        folder = ensure_plain_checkpoint(base_model, cache_dir)
        spec = PolicyTrainingSpec(base_model=str(folder), lora=lora, dtype=dtype, max_length=max_length,
                                  max_prompt_tokens=max_prompt_tokens, max_tokens_per_forward=max_tokens_per_forward,
                                  max_response_tokens=max_response_tokens)
        return cls.from_spec(spec, device=device)

    @classmethod
    def from_spec(cls, spec: PolicyTrainingSpec, *, device: str | torch.device | None = None,
                  adapter: str | os.PathLike | None = None,
                  weights: str | os.PathLike | None = None) -> "TrainablePolicy":
        """Build from a spec: a new adapter, the saved ``adapter``, or (full fine-tuning) saved ``weights``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf = resolve_model_path(spec.base_model)
        if gguf is not None:
            raise InvalidArgument("base_model", f"{spec.base_model} is a GGUF; convert it first with "
                                  "services.policy_model.ensure_plain_checkpoint (from_base does)")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[spec.dtype])
        reference = None
        if spec.lora is not None:
            from peft import LoraConfig, PeftModel, get_peft_model

            check_lora_targets(base, spec.lora.target_modules)
            if adapter is not None:
                model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
            else:
                model = get_peft_model(base, LoraConfig(
                    r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                    target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM"))
        elif weights is not None:
            model, reference = AutoModelForCausalLM.from_pretrained(str(weights), dtype=DTYPES[spec.dtype]), base
        else:
            model = base
        if device is not None:
            model.to(device)
            if reference is not None:
                reference.to(device)
        return cls(model, tokenizer, spec, reference)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, *, base_model: str | os.PathLike | None = None,
                        device: str | torch.device | None = None) -> "TrainablePolicy":
        """Resume from ``save_adapter`` (LoRA) or ``save_merged`` (full fine-tuning) output.

        The base is the plain folder recorded in the checkpoint unless ``base_model`` names another
        copy of it (a different machine's cache).
        """
        d = Path(directory)
        meta = d / TRAIN_SPEC_FILE
        if not meta.exists():
            raise InvalidArgument("checkpoint", f"{d} has no {TRAIN_SPEC_FILE}; give a folder written by "
                                  "save_adapter() or save_merged()")
        values = json.loads(meta.read_text())["spec"]
        if base_model is not None:
            values["base_model"] = str(ensure_plain_checkpoint(base_model))
        spec = PolicyTrainingSpec.from_dict(values)
        if spec.lora is not None:
            if not (d / ADAPTER_CONFIG).exists():
                raise InvalidArgument("checkpoint", f"{d} holds no adapter ({ADAPTER_CONFIG}); resume a LoRA "
                                      "policy from save_adapter() output")
            return cls.from_spec(spec, device=device, adapter=d)
        return cls.from_spec(spec, device=device, weights=d)

    # -- what trains --------------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The ``nn.Module`` whose parameters train; wrap it for DDP and pass the result to :meth:`wrap`."""
        return self._logps

    def wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """``wrap(module) -> module`` (e.g. Ray's ``prepare_model``); :meth:`logps` then calls the wrapper."""
        self._call = wrap(self._logps)
        return self._call

    def to(self, device: torch.device | str) -> "TrainablePolicy":
        """Move the policy (and a full fine-tune's frozen reference) to ``device``."""
        self.model.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- encoding ---------------------------------------------------------------------------------

    def _response_text(self, prompt_text: str, messages: Sequence[Any], response: str, ends: bool = True) -> str:
        """The response as the chat template writes the assistant turn, up to and including its EOS (without
        it when ``ends`` is False: the reply goes on)."""
        eos = self.tokenizer.eos_token
        conv = [{"role": r, "content": c} for r, c in (role_content(m) for m in messages)]
        full = self.tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": response}], tokenize=False)
        text = full[len(prompt_text):] if full.startswith(prompt_text) else response + (eos or "")
        if eos and eos in text:  # what follows the closing EOS (a newline) is never generated
            text = text[: text.rindex(eos) + (len(eos) if ends else 0)]
        return text

    def _plan(self, prompts: Sequence[Sequence[Any]], responses: Sequence[str], ends: Sequence[bool] | None = None
              ) -> tuple[list[tuple[list[int], list[int]] | None], dict[int, str]]:
        """Token ids (prompt, response) of every row, None for a row refused, and the refusals."""
        if len(prompts) != len(responses):
            raise InvalidArgument("responses", f"got {len(responses)} responses for {len(prompts)} prompts; "
                                  "give exactly one response per prompt")
        ends = [True] * len(responses) if ends is None else list(ends)
        if len(ends) != len(responses):
            raise InvalidArgument("ends", f"got {len(ends)} end-of-turn flags for {len(responses)} responses; "
                                  "give one per response")
        reasons = {i: "the response is empty" for i, r in enumerate(responses) if not r or not r.strip()}
        keep = [i for i in range(len(prompts)) if i not in reasons]
        p_texts = [self._serving.render(prompts[i]) for i in keep]
        if self._chat:
            r_texts = [self._response_text(p, prompts[i], responses[i], ends[i]) for p, i in zip(p_texts, keep)]
            eos_ids: list[int] = []
        else:
            r_texts = [" " + responses[i] for i in keep]
            eos_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        # Serving tokenizes the rendered prompt the same way (chat templates write their own BOS).
        p_ids = self.tokenizer(p_texts, add_special_tokens=not self._chat)["input_ids"] if keep else []
        r_ids = [r + (eos_ids if ends[i] else []) for i, r in
                 zip(keep, self.tokenizer(r_texts, add_special_tokens=False)["input_ids"])] if keep else []
        rows: list[tuple[list[int], list[int]] | None] = [None] * len(prompts)
        room = self.response_room
        for i, p, r in zip(keep, p_ids, r_ids):
            if len(r) > self.spec.max_response_tokens:
                reasons[i] = (f"the response has {len(r)} tokens, over max_response_tokens="
                              f"{self.spec.max_response_tokens}; shorten it or raise the budget")
            else:
                rows[i] = (p, r[:room])  # a long response keeps its beginning (and loses its EOS)
        return rows, reasons

    @property
    def response_room(self) -> int:
        """Response tokens a row keeps: ``max_length`` less a quarter (at least 8 tokens) left for the prompt."""
        return self.spec.max_length - max(min(8, self.spec.max_length - 1), self.spec.max_length // 4)

    def rejections(self, prompts: Sequence[Sequence[Any]], responses: Sequence[str],
                   ends: Sequence[bool] | None = None) -> dict[int, str]:
        """Row index -> why it cannot be trained on, for every such row (empty when all are fine)."""
        return self._plan(prompts, responses, ends)[1]

    def encode(self, prompts: Sequence[Sequence[Any]], responses: Sequence[str],
               ends: Sequence[bool] | None = None) -> PolicyBatch:
        """``prompt + response`` rows, right-padded, with the response tokens marked.

        The prompt is rendered and tokenized as serving does and keeps its newest
        ``min(max_prompt_tokens, max_length - response tokens)`` tokens; the response is the
        assistant turn of the chat template up to its EOS, cut after :attr:`response_room` tokens when
        longer (both responses of a pair are compared on their beginnings, as TRL's ``keep_start``).
        ``ends`` (one per row, all True when None): a row whose reply does not end its turn
        (:attr:`PreferenceRecord.unfinished`) stops before the EOS, so its log-prob is that of going on.
        Raises :class:`RejectedResponses` naming every empty response and every response over
        ``max_response_tokens``.
        """
        if not prompts:
            raise InvalidArgument("prompts", "is empty; give at least one (prompt, response) row")
        rows, reasons = self._plan(prompts, responses, ends)
        if reasons:
            raise RejectedResponses(reasons)
        kept, cut = [], 0
        for p_ids, r_ids in rows:  # type: ignore[misc]
            room = min(self.spec.max_prompt_tokens, self.spec.max_length - len(r_ids))
            cut += len(p_ids) > room
            kept.append((p_ids[-room:], r_ids))
        if cut:
            log.debug("%d of %d prompts lost their oldest tokens to max_length=%d", cut, len(kept),
                      self.spec.max_length)
        width = max(len(p) + len(r) for p, r in kept)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(kept), width), pad, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(kept), width), dtype=torch.long)  # (B, T)
        response = torch.zeros((len(kept), width), dtype=torch.bool)  # (B, T)
        for i, (p, r) in enumerate(kept):
            input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            attention[i, : len(p) + len(r)] = 1
            response[i, len(p): len(p) + len(r)] = True
        return PolicyBatch(input_ids, attention, response, prompt_truncated=cut)

    # -- log-probabilities --------------------------------------------------------------------------

    def logps(self, batch: PolicyBatch) -> torch.Tensor:
        """Summed response-token log-probs under the policy, with gradient. # (B,)"""
        batch = batch.to(self.device)
        return self._call(batch.input_ids, batch.attention_mask, batch.response_mask)[0]

    @contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        """The reference in eval mode: the adapter switched off, or the frozen copy."""
        if self._reference is not None:
            yield self._reference
            return
        with _eval_mode(self.model), self.model.disable_adapter():
            yield self.model

    def reference_logps(self, batch: PolicyBatch) -> torch.Tensor:
        """Summed response-token log-probs under the reference, without gradient. # (B,)"""
        return self.reference_read(batch)[0]

    def reference_read(self, batch: PolicyBatch, stops: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`reference_logps` and, with ``stops``, from the same forward, the reference's log-prob of
        :attr:`stop_token` at every position that predicts a reply token (0 elsewhere). # (B,), (B, T) | None"""
        batch = batch.to(self.device)
        with torch.no_grad(), self._reference_model() as ref:
            sums, _, stop_logps = SequenceLogps(ref, self.spec.max_tokens_per_forward, self.logit_temperature,
                                                self.stop_token if stops else None)(
                batch.input_ids, batch.attention_mask, batch.response_mask)
        return sums, stop_logps

    @property
    def stop_token(self) -> int | None:
        """The token that ends a reply (the tokenizer's EOS, which the chat template closes the turn with)."""
        return self.tokenizer.eos_token_id

    def read_stops(self, on: bool) -> None:
        """Make the training forward (:meth:`wrap`'s module) return the stop token's log-prob at every reply
        position as its third output (:class:`SequenceLogps`), or stop doing so."""
        if on and self.stop_token is None:
            raise InvalidArgument("stop_anchor", "the policy's tokenizer has no EOS token to anchor; set stop_anchor to 0")
        self._logps.stop_token = self.stop_token if on else None

    def token_kl(self, prompts: Sequence[Sequence[Any]], replies: Sequence[str]) -> float:
        """Mean per-token ``KL(π‖π_ref)`` over the reply tokens (full vocabulary, exact), in nats."""
        batch = self.encode(prompts, replies).to(self.device)
        lengths = batch.attention_mask.sum(-1).tolist()
        total, tokens = 0.0, 0
        with torch.no_grad(), _eval_mode(self.model):
            for rows in sub_batches(lengths, self.spec.max_tokens_per_forward):
                width = int(lengths[rows[0]])
                ids, att = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]  # (b, t)
                keep = predicting(batch.response_mask[rows, :width].bool())  # (b, t)
                if not keep.any():
                    continue
                pol, mask = _reply_logits(self.model, ids, att, keep)
                with self._reference_model() as ref:
                    refl, _ = _reply_logits(ref, ids, att, keep)
                n = int(mask.sum())
                total += float(mean_token_kl(pol, refl, mask)) * n
                tokens += n
        return total / max(tokens, 1)

    # -- sampling -----------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[Any]], max_new_tokens: int = 128, seed: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, *, reference: bool = False) -> list[str]:
        """One reply per prompt from the live policy (``reference``: from the reference policy), sampled as
        the scorer samples (greedy at 0)."""
        params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        if not reference:
            with _eval_mode(self.model):
                return [g[0] for g in self._serving.generate_batch(prompts, params)]
        with torch.no_grad(), self._reference_model() as ref:
            serving = self._serving if ref is self.model else PolicyModel(ref, self.tokenizer, self._serving.spec)
            return [g[0] for g in serving.generate_batch(prompts, params)]

    # -- saving -------------------------------------------------------------------------------------

    def _write_spec(self, d: Path) -> None:
        (d / TRAIN_SPEC_FILE).write_text(json.dumps({"kind": "policy_lm", "spec": self.spec.to_dict()},
                                                    indent=2, sort_keys=True))

    def save_merged(self, directory: str | os.PathLike) -> Path:
        """A plain HF causal-LM folder (adapter merged into a copy) + tokenizer + both specs.

        It loads with ``AutoModelForCausalLM.from_pretrained``, ``pipeline("text-generation")`` and
        :meth:`services.policy_model.PolicyModel.from_pretrained`; the live model keeps its adapter.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        plain = copy.deepcopy(self.model)
        if self.spec.lora is not None:
            plain = plain.merge_and_unload()
        plain.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        serving = PolicySpec(base_model=self.spec.base_model, dtype=self.spec.dtype,
                             max_prompt_tokens=self.spec.max_prompt_tokens)
        (d / SPEC_FILE).write_text(json.dumps({"kind": "policy", "spec": serving.to_dict()}, indent=2, sort_keys=True))
        self._write_spec(d)
        del plain
        return d

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """The adapter alone (peft format) + the spec :meth:`from_checkpoint` rebuilds from."""
        if self.spec.lora is None:
            raise InvalidArgument("lora", "a fully fine-tuned policy has no adapter; use save_merged()")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d)
        self._write_spec(d)
        return d

