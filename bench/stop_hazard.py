"""``prefstream bench stop-hazard``: where does a policy end its turn, by how long its reply already is?

Every criteria-loop run that cut the word limit moved the whole length distribution down, the median
with the tail (docs/loop.md).  This bench measures why, on the policies a loop published: the base
policy answers the loop's held-out prompts (its system prompt, evaluation temperature and token budget,
a seed per prompt, sampled as the scorer samples), and every policy given with ``--versions`` (and the
base) is read, teacher-forced, at each place one of those replies could end: after a sentence or a line
(:func:`services.criteria_eval.sentence_prefixes`, the cuts mode ``trim`` uses).  There it reports the
probability of ending the turn (the tokenizer's EOS), averaged per 10-word bin of the reply so far.

A policy that learnt a word limit as a limit would raise that hazard near and past the limit and leave
it alone early on.  One that learnt "stop sooner" raises it everywhere.  The reply texts are the base
policy's, so every policy is read at the same places.

Quick mode is a smoke run (two prompts, two 64-token replies each, and the versions given).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

FULL = {"eval_count": 48, "samples": 2, "max_tokens": 128}
QUICK = {"eval_count": 2, "samples": 2, "max_tokens": 64}
#: Width of a length bin in words, and the lower edge of the last one (longer replies fall in it too).
BIN_WORDS = 10
LAST_BIN = 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--versions", nargs="*", default=[],
                   help="published policy folders to read beside the base (e.g. a loop run's "
                        "checkpoints/policy/v000003)")
    p.add_argument("--samples", type=int, default=None, help="base replies per prompt (default 2; 1 quick)")
    p.add_argument("--eval-count", type=int, default=None, help="held-out prompts (default 48 = criteria-loop's)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, as the loop evaluates")


def end_points(reply: str, token_texts: Sequence[str]) -> list[tuple[int, int]]:
    """(token index, words so far) for every token of ``reply`` after which the reply could end.

    ``token_texts[j]`` is the decoded text of the reply's first ``j + 1`` tokens.  A token is an end
    point when that text, without trailing whitespace, is one of the reply's sentence prefixes and
    the token itself completes it (the text up to the previous token is shorter).
    """
    from services.criteria_eval import count_words, sentence_prefixes

    cuts = {len(p): count_words(p) for p in sentence_prefixes(reply)}
    out, before = [], 0
    for j, text in enumerate(token_texts):
        n = len(text.rstrip())
        if n in cuts and n > before and reply.startswith(text.rstrip()):
            out.append((j, cuts[n]))
        before = max(before, n)
    return out


def hazard_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """Mean end-of-turn probability per length bin: ``rows`` hold ``words`` and, per model, ``p``."""
    bins: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        b = bins.setdefault(min(r["words"] // BIN_WORDS * BIN_WORDS, LAST_BIN), {m: [] for m in models})
        for m in models:
            b[m].append(float(r["p"][m]))
    return [{"words": f"{lo}-{lo + BIN_WORDS - 1}" if lo < LAST_BIN else f"{LAST_BIN}+", "end_points": len(v[models[0]]),
             **{m: sum(v[m]) / len(v[m]) for m in models}} for lo, v in sorted(bins.items())]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.criteria_loop import held_out
    from loop.prompts import conversation
    from services.errors import InvalidArgument
    from services.policy_model import PolicyModel, SamplingParams

    sizes = dict(QUICK if args.quick else FULL)
    if args.samples:
        sizes["samples"] = args.samples
    if args.eval_count:
        sizes["eval_count"] = args.eval_count
    for v in args.versions:
        if not Path(v).is_dir():
            raise InvalidArgument("versions", f"{v} is not a folder; give published policy folders")
    loop, plan = held_out(sizes["eval_count"], args.seed)
    started = time.perf_counter()
    base = PolicyModel.from_pretrained()
    models = {"base": base, **{Path(v).name: PolicyModel.from_pretrained(v) for v in args.versions}}
    tok = base.tokenizer
    eos = base.hf_model.generation_config.eos_token_id or tok.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    rows: list[dict[str, Any]] = []
    replies_read = 0
    for i, prompt in enumerate(plan.eval_prompts):
        conv = conversation(prompt, loop.system_prompt)
        [replies] = base.generate_batch([conv], SamplingParams(
            n=sizes["samples"], temperature=loop.eval_temperature, max_tokens=sizes["max_tokens"], seed=args.seed + i))
        prompt_ids = tok(base.render(conv), add_special_tokens=False)["input_ids"]
        for reply in replies:
            reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
            points = end_points(reply, [tok.decode(reply_ids[:j + 1]) for j in range(len(reply_ids))])
            if not points:
                continue
            replies_read += 1
            ids = torch.tensor([prompt_ids + reply_ids])
            p_end: dict[str, list[float]] = {}
            for name, m in models.items():
                with torch.no_grad():
                    logits = m.hf_model(input_ids=ids.to(m.hf_model.device)).logits[0].float()
                at = torch.tensor([len(prompt_ids) + j for j, _ in points])  # logits there predict the next token
                p_end[name] = torch.softmax(logits[at], dim=-1)[:, eos].tolist()
            rows += [{"words": w, "p": {name: p_end[name][k] for name in models}} for k, (_, w) in enumerate(points)]
        if (i + 1) % 8 == 0 or i + 1 == len(plan.eval_prompts):
            log.info("%d/%d prompts answered and read (%.0f s)", i + 1, len(plan.eval_prompts), time.perf_counter() - started)
    if not rows:
        raise InvalidArgument("max_tokens", "no reply had a place to end (a sentence or a line end); sample longer replies")
    return {
        "models": list(models),
        "versions": list(args.versions),
        "eval_prompts": len(plan.eval_prompts),
        "replies": replies_read,
        "end_points": len(rows),
        "hazard_by_words": hazard_table(rows, list(models)),
        "settings": {"system_prompt": loop.system_prompt, "temperature": loop.eval_temperature,
                     "max_tokens": sizes["max_tokens"], "samples_per_prompt": sizes["samples"], "seed": args.seed,
                     "policy": "embedded SmolLM2-135M-Instruct", "eos_token_id": eos},
        "generate_and_read_s": round(time.perf_counter() - started, 1),
    }
