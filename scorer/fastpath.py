"""A faster eager forward for BERT encoders served in bf16 on CPU.

Why it exists: served in bf16 on the 2-core Zen 4 dev box, MiniLM-L6 reached ~0.5 of the bf16 GEMM
bound although its Linear layers run at ~95% of it.  The rest was work that is not a matmul:
torch's CPU flash attention took ~30% of the time for ~6% of the FLOPs (head_dim 32 and ~150 tokens
are far from what its blocking is tuned for), then the GELU and residual-add passes over memory and
the copies of transposed q/k/v views.  ``torch.compile`` with freezing recovers only part of it
(attention stays sdpa) for 12-20 s of compilation per checkpoint load, a C++ compiler, and a
recompile on every hot swap.  This module stays eager and changes five BERT modules in place:

* ``BertSelfAttention``: Q, K and V in one GEMM (weights concatenated, ``1/sqrt(head_dim)`` folded
  into Q), then attention a few sequences at a time: ``q @ k^T``, -inf on padding keys (probability
  exactly 0, so the result equals leaving them out), a oneDNN softmax (~2x torch's on bf16; its exp
  is cheaper) and ``p @ v``.  A few sequences' (heads, T, T) scores (~2 MB) stay in L2 where a whole
  batch's (~8 MB at 16 x 146 tokens) would not: ~2.5x faster than sdpa there.
* ``BertIntermediate``: dense + GELU in one oneDNN call, the GELU applied as a post-op while the
  output tile is still in cache.
* ``BertSelfOutput`` / ``BertOutput``: dense + residual add in one oneDNN call (binary post-op).
* ``BertEncoder``: a padded batch's real tokens are gathered once after the embeddings into an
  (N, H) matrix and every token-wise op above (QKV GEMM, dense + GELU, both dense + residual +
  LayerNorm) runs on them only, through the same helpers as the padded modules.  The scorer's batches
  are ~84% real tokens on the benchmark inputs, so ~16% of the dense FLOPs went to padding.  Attention
  runs per group of similar-length sequences (packed longest first, as many per group as keep the
  scores ~L2-sized), each padded to its own longest only for the scores (~6% of the FLOPs): one gather
  puts the group's q/k/v rows in heads-major order, one gathers its real context rows back.  The result
  is scattered to (B, T, H) with zeros at padded positions (the stock forward's values there mean
  nothing), so the pooler, the head and callers see the usual shapes.  ~17% more sequences/s on 24
  MiniLM sequences of 100-150 tokens (16% padding), single thread.  Only right-padded batches with
  some padding are packed, and only when no per-layer output is requested (``output_hidden_states``,
  ``output_attentions``: transformers records them with hooks on the layers, which the packed loop does
  not call; nor does any other hook on the layers, their attention or their Linear layers fire there);
  otherwise the stock layer loop runs the padded fast modules.
* The GEMMs use weights prepacked once into oneDNN's blocked layout (a bf16 copy of the encoder's
  Linear weights beside the originals); packs are rebuilt if a weight is replaced or written to.

The modules keep their classes' parameters, names and state dict (the fast classes subclass the
stock ones and add no parameters), and every fast forward falls back to the stock one whenever it
does not apply: gradients enabled, training mode, not CPU bf16, a KV cache, cross-attention, or a
mask that is not a key-padding mask (or pads every key of a sequence).  :func:`apply_cpu_fast_path`
also checks the result against the stock forward on a small padded batch of very different lengths
(the packed path) and on an unpadded one (the padded modules), and reverts if they disagree.

To get a compact mask the model's attention implementation is switched to ``prefstream_cpu_bf16``,
registered with transformers' ``AttentionInterface`` as its own ``sdpa`` function and with
``AttentionMaskInterface`` as a (B, 1, 1, T) key-padding mask (sdpa broadcasts it) in place of
sdpa's materialised (B, 1, T, T) one; so any stock attention call stays sdpa.  Do not
``save_pretrained`` a model after applying this: its config would name that implementation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers.models.bert import modeling_bert as bert

try:  # transformers >= 5 records per-layer outputs with hooks on the layers while a collector is set
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None

log = logging.getLogger(__name__)

#: Attention implementation name the fast path registers with transformers (see the module docstring).
ATTN_IMPLEMENTATION = "prefstream_cpu_bf16"
#: ``config.hidden_act`` values whose GELU oneDNN applies as a post-op, with its algorithm name.
_GELU_ALGORITHM = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}
#: Self-check tolerance: largest |fast - stock| over the real tokens' final hidden states (LayerNorm
#: outputs, ~N(0, 1)); bf16 rounding of two summation orders stays ~10x below it on MiniLM-L6.
_CHECK_MAX_DIFF = 0.25
#: Bytes of bf16 attention scores computed at once (sequences x heads x T x T x 2): ~L2-sized.
_SCORES_BYTES = 2 << 20
_logged_once = False


# ---------------------------------------------------------------------------------------------- availability


def _onednn_ops_available() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise.default  # noqa: B018 - resolving the overloads is the check
        torch.ops.mkldnn._linear_pointwise.binary  # noqa: B018
        torch.ops.mkldnn._reorder_linear_weight.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fast_path_refusal(hf_model: nn.Module) -> str | None:
    """Why the fast path cannot serve ``hf_model`` (None when it can)."""
    cfg = hf_model.config
    layers = [m for m in hf_model.modules() if isinstance(m, bert.BertLayer)]
    if getattr(cfg, "model_type", None) != "bert" or not layers:
        return f"not a BERT encoder (model_type {getattr(cfg, 'model_type', None)!r})"
    if cfg.is_decoder or getattr(cfg, "add_cross_attention", False):
        return "a BERT decoder (causal or cross-attention)"
    if cfg._attn_implementation not in ("sdpa", ATTN_IMPLEMENTATION):
        return f"attention implementation {cfg._attn_implementation!r} (the fast path replaces sdpa)"
    weight = layers[0].attention.self.query.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return f"encoder weights are {weight.dtype} on {weight.device.type}, not bf16 on cpu"
    if not _onednn_ops_available():
        return "this torch has no oneDNN bf16 fused linear ops"
    return None


# ---------------------------------------------------------------------------------------------- mask


def _key_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                      allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
                      device: torch.device | str = "cpu", **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask, but (B, 1, 1, kv) for a plain bidirectional padding mask instead of (B, 1, q, kv).

    Anything else (causal, offsets, custom mask functions) is built by sdpa's own mask function.
    """
    from transformers import masking_utils as mu

    if mask_function is not mu.bidirectional_mask_function or q_offset or kv_offset or use_vmap:
        return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                            mask_function=mask_function or mu.causal_mask_function, attention_mask=attention_mask,
                            allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                            device=device, **kwargs)
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, >= kv) bool or None
    if padding is None or (allow_is_bidirectional_skip and bool(padding.all())):
        if allow_is_bidirectional_skip:
            return None
        return torch.ones(batch_size, 1, 1, kv_length, dtype=torch.bool, device=device)
    return padding[:, None, None, :kv_length]  # (B, 1, 1, kv)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _key_padding_mask)


def _key_padding(mask: torch.Tensor | None, batch: int, length: int) -> tuple[torch.Tensor | None, list[int] | None] | None:
    """(key mask, real keys per sequence) for a key-padding ``mask``: the (B, T) mask is None when no key
    is padded, the counts are None unless every sequence's real keys come first (right padding).
    None for any other mask (per-query masks, all keys of a sequence padded, float biases)."""
    if mask is None:
        return None, [length] * batch
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != length:
        return None
    keys = mask[:, 0, 0, :]  # (B, T)
    counts = keys.sum(-1)  # (B,)
    if not bool((counts > 0).all()):
        return None
    right_padded = torch.arange(length, device=keys.device) < counts[:, None]  # (B, T)
    return keys, (counts.tolist() if torch.equal(keys, right_padded) else None)


# ---------------------------------------------------------------------------------------------- packed weights


class _PackedLinear:
    """One oneDNN-packed bf16 weight (and bias) built from Linear layer(s), rebuilt when they change.

    ``scales`` multiplies each source's rows (the attention scale folded into Q) before packing.
    """

    def __init__(self, linears: list[nn.Linear], scales: list[float] | None = None) -> None:
        self.linears = linears
        self.scales = scales or [1.0] * len(linears)
        self.key: tuple[Any, ...] | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def _source(self) -> tuple[Any, ...]:
        return tuple((t.data_ptr(), t._version) for m in self.linears for t in (m.weight, m.bias) if t is not None)

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self._source()
        if key != self.key:
            with torch.no_grad():
                w = torch.cat([(m.weight.float() * s).to(m.weight.dtype) if s != 1.0 else m.weight
                               for m, s in zip(self.linears, self.scales)])  # (N, K)
                biases = [m.bias for m in self.linears]
                b = None if any(x is None for x in biases) else torch.cat(
                    [(x.float() * s).to(x.dtype) if s != 1.0 else x for x, s in zip(biases, self.scales)])  # (N,)
                self.weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
                self.bias = b.contiguous() if b is not None else None
            self.key = key
        return self.weight, self.bias  # type: ignore[return-value]


def _runs_fast(module: nn.Module, x: torch.Tensor) -> bool:
    return (getattr(module, "_prefstream_fast", False) and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 3)


# ---------------------------------------------------------------------------------------------- fast modules


def _fused_qkv(attention: FastBertSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Q, K and V of ``x`` (..., H) in one GEMM: (..., 3 * heads * head_dim), Q already scaled."""
    weight, bias = attention._prefstream_qkv.get()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _dense_gelu(intermediate: FastBertIntermediate, x: torch.Tensor) -> torch.Tensor:
    """GELU(dense(x)), the GELU as the GEMM's post-op: (..., H) -> (..., I)."""
    weight, bias = intermediate._prefstream_dense.get()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], intermediate._prefstream_gelu)


def _dense_add_norm(module: _DenseAddNorm, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """LayerNorm(dense(x) + residual), the add as the GEMM's post-op: (..., K) -> (..., H)."""
    weight, bias = module._prefstream_dense.get()
    summed = torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")  # (..., H)
    return module.LayerNorm(summed)  # type: ignore[attr-defined]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, counts: list[int] | None,
            keys: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T) v for c sequences' heads-major (c*heads, T, D) q (scaled), k, v, padding keys at -inf.

    ``counts``: real (leading) keys per sequence; else ``keys``: (c, T) bool, True = real; both None =
    no padding.  Returns (c*heads, T, D); rows of padded queries are garbage (finite if k, v are).
    """
    n, length, _ = q.shape
    scores = torch.bmm(q, k.transpose(1, 2))  # (c*H, T, T)
    per_seq = scores.view(n // heads, heads, length, length)  # (c, H, T, T)
    # Padding keys get -inf, so exactly 0 probability: the same result as leaving them out.
    if counts is not None:
        for i, real in enumerate(counts):
            if real < length:
                per_seq[i, :, :, real:] = float("-inf")
    elif keys is not None:
        per_seq.masked_fill_(~keys[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.to_mkldnn(), -1).to_dense()  # (c*H, T, T)
    return torch.bmm(probs, v)  # (c*H, T, D)


def _sequences_per_chunk(heads: int, length: int, batch: int) -> int:
    """Sequences whose attention runs at once.  Single-threaded (the scorer's default: one thread per
    worker), as many as keep their bf16 scores within ~L2 (best at 2 MB).  Multi-threaded, the whole batch
    at once: each op ends at an OpenMP barrier, and on a shared box a preempted thread stalls every barrier
    (chunked was ~4x slower than this at 2 threads and load 4)."""
    if torch.get_num_threads() != 1:
        return batch
    return max(1, _SCORES_BYTES // (heads * length * length * 2))


class FastBertSelfAttention(bert.BertSelfAttention):
    """Fused QKV GEMM, then attention a few sequences at a time with padding keys at -inf (module docstring)."""

    _prefstream_fast: bool
    _prefstream_qkv: _PackedLinear

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        padding = None
        if (_runs_fast(self, hidden_states) and past_key_values is None
                and kwargs.get("encoder_hidden_states") is None):
            padding = _key_padding(attention_mask, hidden_states.shape[0], hidden_states.shape[1])
        if padding is None:
            return super().forward(hidden_states, attention_mask, past_key_values=past_key_values, **kwargs)
        keys, counts = padding
        batch, length, _ = hidden_states.shape
        heads, dim = self.num_attention_heads, self.attention_head_size
        qkv = _fused_qkv(self, hidden_states).view(batch, length, 3, heads, dim)  # (B, T, 3, H, D)
        out = hidden_states.new_empty(batch, length, heads, dim)  # (B, T, H, D)
        step = _sequences_per_chunk(heads, length, batch)
        for b0 in range(0, batch, step):
            b1 = min(batch, b0 + step)
            # Heads-major copy of this chunk only, so it is still in cache for the bmm.
            q, k, v = qkv[b0:b1].permute(2, 0, 3, 1, 4).reshape(3, (b1 - b0) * heads, length, dim).unbind(0)
            context = _attend(q, k, v, heads, counts[b0:b1] if counts is not None else None,
                              keys[b0:b1] if keys is not None else None)  # (c*H, T, D)
            out[b0:b1].copy_(context.view(b1 - b0, heads, length, dim).transpose(1, 2))
        return out.view(batch, length, heads * dim), None


class FastBertIntermediate(bert.BertIntermediate):
    """dense + GELU in one oneDNN call."""

    _prefstream_fast: bool
    _prefstream_dense: _PackedLinear
    _prefstream_gelu: str

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _runs_fast(self, hidden_states):
            return super().forward(hidden_states)
        return _dense_gelu(self, hidden_states)


class _DenseAddNorm:
    """LayerNorm(dense(x) + residual) with the add as the GEMM's post-op; mixed into BertSelfOutput and
    BertOutput, whose stock forwards are the same computation."""

    _prefstream_dense: _PackedLinear

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if not _runs_fast(self, hidden_states) or input_tensor.shape[:-1] != hidden_states.shape[:-1]:
            return super().forward(hidden_states, input_tensor)  # type: ignore[misc]
        return _dense_add_norm(self, hidden_states, input_tensor)


class FastBertSelfOutput(_DenseAddNorm, bert.BertSelfOutput):
    """The attention block's output projection + residual + LayerNorm."""

    _prefstream_fast: bool


class FastBertOutput(_DenseAddNorm, bert.BertOutput):
    """The feed-forward block's output projection + residual + LayerNorm."""

    _prefstream_fast: bool


# ---------------------------------------------------------------------------------------------- packed encoder


@dataclass(frozen=True)
class _Group:
    """Sequences of similar length whose attention runs together, padded to the longest of them."""

    start: int  # first packed row
    stop: int  # one past the last packed row
    counts: list[int]  # real tokens per sequence, longest first
    length: int  # the group's padded length (its longest sequence)
    gather: torch.Tensor  # (3 * c*heads*length,) rows of the (N*3*heads, D) qkv view: q, k, v heads-major
    scatter: torch.Tensor  # ((stop-start)*heads,) rows of the (c*heads*length, D) context, real tokens only


@dataclass(frozen=True)
class _Packing:
    """Where a right-padded batch's real tokens go: packed longest sequence first, then in groups."""

    rows: torch.Tensor  # (N,) the real tokens' rows of the (B*T, H) padded hidden states, in packed order
    groups: list[_Group]


def _pack(counts: list[int], length: int, heads: int) -> _Packing:
    """The packing of a right-padded batch with ``counts`` real tokens per sequence (all > 0)."""
    order = sorted(range(len(counts)), key=lambda b: -counts[b])  # longest first, so groups have similar lengths
    rows = torch.cat([torch.arange(counts[b]) + b * length for b in order])  # (N,)
    sorted_counts = [counts[b] for b in order]
    groups, i, start = [], 0, 0
    while i < len(order):
        longest = sorted_counts[i]
        group = sorted_counts[i:i + _sequences_per_chunk(heads, longest, len(order))]
        lens = torch.tensor(group)  # (c,)
        first = torch.cumsum(lens, 0) - lens  # (c,) each sequence's first row within the group
        # Padded positions read the sequence's last real row: finite, and its key gets -inf anyway.
        pos = torch.minimum(torch.arange(longest)[None, :], lens[:, None] - 1)  # (c, T)
        row = (start + first[:, None] + pos)[None, :, None, :]  # (1, c, 1, T)
        gather = (row * 3 + torch.arange(3)[:, None, None, None]) * heads + torch.arange(heads)[None, None, :, None]
        seq = torch.repeat_interleave(torch.arange(len(group)), lens)  # (n,) each real token's sequence
        tok = torch.arange(int(lens.sum())) - first[seq]  # (n,) its position in the sequence
        scatter = (seq[:, None] * heads + torch.arange(heads)[None, :]) * longest + tok[:, None]  # (n, heads)
        stop = start + int(lens.sum())
        groups.append(_Group(start, stop, group, longest, gather.reshape(-1), scatter.reshape(-1)))
        i, start = i + len(group), stop
    return _Packing(rows, groups)


def _packed_attention(attention: FastBertSelfAttention, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """Self-attention of packed tokens (N, H) -> (N, heads*D), each group padded only for its scores."""
    heads, dim = attention.num_attention_heads, attention.attention_head_size
    qkv = _fused_qkv(attention, x).view(-1, dim)  # (N*3*heads, D)
    out = x.new_empty(x.shape[0], heads * dim)  # (N, heads*D)
    for g in packing.groups:
        n = len(g.counts) * heads
        q, k, v = qkv.index_select(0, g.gather).view(3, n, g.length, dim).unbind(0)  # (c*heads, T, D); q scaled
        context = _attend(q, k, v, heads, g.counts, None)  # (c*heads, T, D)
        torch.index_select(context.view(-1, dim), 0, g.scatter, out=out[g.start:g.stop].view(-1, dim))
    return out


def _capturing_outputs(config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this forward must return attentions or per-layer hidden states (the layers' own outputs)."""
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return True
    if getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False):
        return True
    return _active_collector is not None and bool(_active_collector.get())


def _packable_layer(layer: nn.Module) -> bool:
    attention = layer.attention
    return (type(layer) is bert.BertLayer and type(attention) is bert.BertAttention and not layer.is_decoder
            and not attention.is_cross_attention
            and type(attention.self) is FastBertSelfAttention and type(attention.output) is FastBertSelfOutput
            and type(layer.intermediate) is FastBertIntermediate and type(layer.output) is FastBertOutput
            and all(m._prefstream_fast for m in (attention.self, attention.output, layer.intermediate, layer.output)))


class FastBertEncoder(bert.BertEncoder):
    """The layer loop on the real tokens only, packed (module docstring); else the stock loop, whose
    layers still run the padded fast modules."""

    _prefstream_fast: bool

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool | None = None,
                **kwargs: Any) -> bert.BaseModelOutputWithPastAndCrossAttentions:
        counts = None
        if (_runs_fast(self, hidden_states) and encoder_hidden_states is None and encoder_attention_mask is None
                and past_key_values is None and not use_cache and not _capturing_outputs(self.config, kwargs)
                and all(_packable_layer(layer) for layer in self.layer)):
            padding = _key_padding(attention_mask, hidden_states.shape[0], hidden_states.shape[1])
            counts = padding[1] if padding is not None else None
        if counts is None or sum(counts) == hidden_states.shape[0] * hidden_states.shape[1]:
            # Not right-padded (nothing to gain, or a mask packing cannot reproduce at padded positions).
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        return bert.BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self._packed(hidden_states, counts))

    def _packed(self, hidden_states: torch.Tensor, counts: list[int]) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        packing = _pack(counts, length, self.layer[0].attention.self.num_attention_heads)
        x = hidden_states.reshape(batch * length, width).index_select(0, packing.rows)  # (N, H)
        for layer in self.layer:
            attention = layer.attention
            x = _dense_add_norm(attention.output, _packed_attention(attention.self, x, packing), x)  # (N, H)
            x = _dense_add_norm(layer.output, _dense_gelu(layer.intermediate, x), x)  # (N, H)
        # Padded positions come back as zeros: the stock forward's values there are meaningless anyway.
        out = hidden_states.new_zeros(batch * length, width)  # (B*T, H)
        out.index_copy_(0, packing.rows, x)
        return out.view(batch, length, width)


_FAST: dict[type[nn.Module], type[nn.Module]] = {
    bert.BertSelfAttention: FastBertSelfAttention,
    bert.BertIntermediate: FastBertIntermediate,
    bert.BertSelfOutput: FastBertSelfOutput,
    bert.BertOutput: FastBertOutput,
    bert.BertEncoder: FastBertEncoder,
}
_STOCK = {fast: stock for stock, fast in _FAST.items()}


# ---------------------------------------------------------------------------------------------- apply


def _convert(hf_model: nn.Module) -> int:
    """Give the recognised modules their fast class in place; returns how many were converted."""
    gelu = _GELU_ALGORITHM.get(hf_model.config.hidden_act) if isinstance(hf_model.config.hidden_act, str) else None
    converted = 0
    for module in hf_model.modules():
        stock = type(module)  # exact class only: a subclass may have changed forward
        if stock not in _FAST or (stock is bert.BertIntermediate and gelu is None):
            continue
        if stock is bert.BertEncoder:
            pass  # no weights of its own: it runs its layers' packed ops
        elif stock is bert.BertSelfAttention:
            scale = module.scaling
            module._prefstream_qkv = _PackedLinear([module.query, module.key, module.value], [scale, 1.0, 1.0])
            module._prefstream_qkv.get()
        else:
            module._prefstream_dense = _PackedLinear([module.dense])
            module._prefstream_dense.get()
            if stock is bert.BertIntermediate:
                module._prefstream_gelu = gelu
        # The fast class subclasses the stock one and adds no parameters: same state dict, hooks, children.
        module.__class__ = _FAST[stock]
        module._prefstream_fast = True
        converted += 1
    return converted


def _set_enabled(hf_model: nn.Module, enabled: bool) -> None:
    for module in hf_model.modules():
        if type(module) in _STOCK:
            module._prefstream_fast = enabled


def revert_cpu_fast_path(hf_model: nn.Module) -> None:
    """Give every fast module its stock class back and restore sdpa."""
    for module in hf_model.modules():
        if type(module) in _STOCK:
            module.__class__ = _STOCK[type(module)]
            for name in ("_prefstream_fast", "_prefstream_qkv", "_prefstream_dense", "_prefstream_gelu"):
                module.__dict__.pop(name, None)
    if hf_model.config._attn_implementation == ATTN_IMPLEMENTATION:
        hf_model.config._attn_implementation = "sdpa"


def _self_check(hf_model: nn.Module) -> float:
    """Largest |fast - stock| over the real tokens' final hidden states of a small right-padded batch.

    Its lengths differ widely (one token to ~40), so it runs the packed encoder, as served batches do;
    the batch cut to its shortest length (no padding) runs the padded fast modules, as equal-length ones do.
    """
    cfg = hf_model.config
    gen = torch.Generator().manual_seed(0)
    lengths = [min(n, cfg.max_position_embeddings) for n in (40, 29, 8, 1)]
    ids = torch.randint(1, cfg.vocab_size, (len(lengths), max(lengths)), generator=gen)  # (B, T)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    base = hf_model.base_model

    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return base(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, H)

    diff = 0.0
    for ids_, mask_ in ((ids, mask), (ids[:, :min(lengths)], mask[:, :min(lengths)])):
        _set_enabled(hf_model, False)
        stock = hidden(ids_, mask_)
        _set_enabled(hf_model, True)
        fast = hidden(ids_, mask_)
        diff = max(diff, float((fast - stock)[mask_.bool()].abs().max()))
    return diff


def apply_cpu_fast_path(hf_model: nn.Module) -> bool:
    """Switch a bf16 BERT encoder on CPU to the fast path, in place; False (model untouched) where it
    does not apply, with the reason at DEBUG (or WARNING when the self-check fails)."""
    global _logged_once
    reason = fast_path_refusal(hf_model)
    if reason is not None:
        log.debug("CPU fast path not applied to %s: %s", type(hf_model).__name__, reason)
        return False
    try:
        _register_attention()
        hf_model.config._attn_implementation = ATTN_IMPLEMENTATION
        converted = _convert(hf_model)
        diff = _self_check(hf_model)
    except Exception:  # noqa: BLE001 - any failure leaves the stock model serving; the cause is logged
        log.warning("CPU fast path failed on %s; serving the stock forward", type(hf_model).__name__, exc_info=True)
        revert_cpu_fast_path(hf_model)
        return False
    if not diff <= _CHECK_MAX_DIFF:
        log.warning("CPU fast path differs from the stock forward by %.3g (> %.3g) on %s; serving the stock forward",
                    diff, _CHECK_MAX_DIFF, type(hf_model).__name__)
        revert_cpu_fast_path(hf_model)
        return False
    (log.info if not _logged_once else log.debug)(
        "CPU bf16 fast path on for %s: %d modules (packed real tokens, fused QKV, GELU and residual GEMMs, "
        "L2-sized attention); self-check max |diff| %.3g", type(hf_model).__name__, converted, diff)
    _logged_once = True
    return True


__all__ = ["ATTN_IMPLEMENTATION", "FastBertEncoder", "FastBertIntermediate", "FastBertOutput", "FastBertSelfAttention",
           "FastBertSelfOutput", "apply_cpu_fast_path", "fast_path_refusal", "revert_cpu_fast_path"]
