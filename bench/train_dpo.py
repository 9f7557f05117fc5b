"""``prefstream bench train-dpo``: DPO policy quality, throughput and memory of the trainer against TRL.

Every arm trains a LoRA adapter on the same base policy (the embedded SmolLM2-135M-Instruct), with the
same pairs, β, learning rate and warm-up, max length, epochs, batch size and LoRA settings, and every
arm is judged by the same code: :meth:`trainer.objectives.dpo.DPOObjective.evaluate` (implicit-reward
pairwise accuracy β·(log π − log π_ref), ties wrong, plus the guard's KL and reply statistics) on the
same test pairs, in this process, with one evaluator whose cached reference log-probs every arm shares.

* ``offline``: :func:`trainer.offline.train_offline` (shuffled epochs through the Learner step);
* ``streaming``: the pairs produced as PreferenceRecords, in the offline arm's batch order, to a fresh
  1-partition topic of a real local Kafka broker and trained by :func:`trainer.runtime.run_in_process`
  (KafkaSource, ContinualTrainer, a checkpoint at the end) with replay off, so that it makes one pass
  like every other arm; its final checkpoint is evaluated.  ``streaming_replay`` is the same loop with
  the trainer's default replay on top.  When Kafka cannot be started the same loops run over an
  in-memory source and the result says ``streaming_source: memory``;
* ``trl``: TRL's ``DPOTrainer`` with a peft LoRA of the same settings, given the very token ids our
  policy trains on (a pre-tokenized dataset: TRL's own preprocessing would render and cut the text
  differently), then its adapter weights copied into one of our policies and evaluated like the others.

Each training arm runs in its own spawned process, so ``peak_rss_mb`` (ours) and ``peak_rss_mb_trl``
are separate peaks (``ru_maxrss`` of that process, read right after training, before evaluation).

``ref_cache_speedup``: steps per second with the reference log-probs cached at admission (what the
objective does) vs recomputed for every step (the cache emptied before each step), on the same
batches, the two learners alternating step by step so load from other processes hits both alike.

Pairs: the first pairs of the data files that the policy accepts (it cuts a long response to its
first tokens, as TRL's ``keep_start``, and refuses only empty ones and ones over
``max_response_tokens``); TRL gets exactly the cut token ids our arms train on.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.arms import paired_diff
from services.config import replace as config_replace

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-records", type=int, default=None, help="training pairs (quick 8, full 192)")
    p.add_argument("--test-records", type=int, default=None, help="test pairs (quick 8, full 240)")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + response tokens per row (quick 64, full 128)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (every arm)")
    p.add_argument("--autocast", default="auto", choices=("none", "bf16", "auto"),
                   help="mixed precision of every arm (TRL gets bf16=True where ours resolves to bf16)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step (every arm)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the LoRA (every arm)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up steps (every arm); 0 = the full rate from the first step in both schedulers, "
                        "whose warm-ups are one step apart (ours starts at lr/warmup, transformers' at 0)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β (every arm)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on q,k,v,o (every arm; alpha = 2 x rank)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (quick 0, full 0,1,2)")
    p.add_argument("--guard-prompts", type=int, default=None, help="held-out prompts replied to for KL and length (quick 2, full 4)")
    p.add_argument("--guard-max-new-tokens", type=int, default=None, help="reply length of the guard, tokens (quick 16, full 32)")
    p.add_argument("--ref-cache-steps", type=int, default=None, help="timed steps per arm of the reference-cache measurement (quick 1, full 3)")
    p.add_argument("--skip-trl", action="store_true", help="leave out the TRL DPOTrainer arm")
    p.add_argument("--no-kafka", action="store_true", help="stream from memory instead of a local Kafka broker")
    p.add_argument("--stream-partitions", type=int, default=1,
                   help="partitions of the streaming arm's topic; 1 (default) keeps the offline arm's record order, "
                        "so the arms differ in the machinery only; more interleave the records by key "
                        "(the stack's preference topic has 4), which changes which records share a step")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    return {
        "base_model": "",
        "train_records": args.train_records or (8 if quick else 192),
        "test_records": args.test_records or (8 if quick else 240),
        "max_length": args.max_length or (64 if quick else 128),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "beta": args.beta,
        "dpo_loss": "sigmoid",
        "lora_rank": args.lora_rank,
        "lora_alpha": 2.0 * args.lora_rank,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "max_grad_norm": 1.0,
        "ema_decay": 0.0,
        "autocast": args.autocast,
        "guard_prompts": args.guard_prompts if args.guard_prompts is not None else (2 if quick else 4),
        "guard_max_new_tokens": args.guard_max_new_tokens or (16 if quick else 32),
        "ref_cache_steps": args.ref_cache_steps or (1 if quick else 3),
        "seeds": [int(x) for x in (args.seeds or ("0" if quick else "0,1,2")).split(",") if x.strip()],
        "kafka": not args.no_kafka,
        "stream_partitions": args.stream_partitions,
        "trl": not args.skip_trl,
    }


def _config(s: dict[str, Any], **kw: Any) -> Any:
    from trainer.config import trainer_config

    values = dict(model_kind="policy", base_model=s["base_model"], max_length=s["max_length"], epochs=s["epochs"],
                  batch_size=s["batch_size"], lr=s["lr"], warmup_steps=s["warmup_steps"], beta=s["beta"],
                  dpo_loss=s["dpo_loss"], lora_rank=s["lora_rank"], lora_alpha=s["lora_alpha"],
                  lora_dropout=s["lora_dropout"], lora_target_modules=tuple(s["lora_target_modules"]),
                  max_grad_norm=s["max_grad_norm"], ema_decay=s["ema_decay"], autocast=s["autocast"],
                  disable_dropout=True, guard_prompts=s["guard_prompts"],
                  guard_max_new_tokens=s["guard_max_new_tokens"], publish=False, max_batch_wait_s=0.0,
                  poll_timeout_s=0.05, checkpoint_every_records=0, checkpoint_every_s=3600.0, eval_batch_size=16)
    values.update(kw)
    return trainer_config(**values)


# ---------------------------------------------------------------------------------------- pure parts


def fitting_pairs(records: Sequence[Any], rejections: Callable[[Any], dict[int, str]], n: int) -> list[Any]:
    """The first ``n`` records none of whose responses is refused (``rejections(record)`` is empty)."""
    out: list[Any] = []
    for rec in records:
        if len(out) == n:
            break
        if not rejections(rec):
            out.append(rec)
    return out


def trl_example(chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]) -> dict[str, list[int]]:
    """One TRL DPO example from our (prompt ids, response ids) rows of a pair.

    Our rows cut the prompt from the left to fit each response; TRL keeps one prompt per pair, so it
    gets the shorter cut (a suffix of the longer one), with which both of its rows fit ``max_length``.
    """
    (pc, rc), (pr, rr) = chosen, rejected
    prompt = pc if len(pc) <= len(pr) else pr
    longer = pr if prompt is pc else pc
    if prompt and longer[len(longer) - len(prompt):] != prompt:
        raise ValueError("the two prompt cuts of a pair do not share their newest tokens")
    return {"prompt_ids": list(prompt), "chosen_ids": list(rc), "rejected_ids": list(rr)}


def split_row(input_ids: Sequence[int], attention: Sequence[int], response: Sequence[bool]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one encoded row (right-padded, response tokens marked)."""
    n = int(sum(attention))
    ids = [int(x) for x in input_ids[:n]]
    marks = [bool(x) for x in response[:n]]
    start = marks.index(True) if True in marks else n
    return ids[:start], [t for t, m in zip(ids, marks) if m]


def speedup(cached: Sequence[float], recomputed: Sequence[float]) -> dict[str, float]:
    """Step-time comparison of two arms timed on the same batches: medians (robust to load bursts)."""
    if not cached or len(cached) != len(recomputed):
        raise ValueError("give the same number (>= 1) of step times for both arms")
    return {"speedup": statistics.median(recomputed) / statistics.median(cached),
            "speedup_mean": sum(recomputed) / sum(cached),
            "median_step_s_cached": statistics.median(cached),
            "median_step_s_recomputed": statistics.median(recomputed),
            "steps_per_s_cached": len(cached) / sum(cached),
            "steps_per_s_recomputed": len(recomputed) / sum(recomputed)}


def arm_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One arm over seeds: mean accuracy, spread, throughput, peak memory, and every run."""
    acc = [r["accuracy"] for r in runs]
    return {"accuracy": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_per_seed": acc,
            "records_per_s": statistics.fmean(r["records_per_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "kl_to_ref": statistics.fmean(r["kl_to_ref"] for r in runs),
            "mean_words": statistics.fmean(r["mean_words"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs), "runs": list(runs)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------- arms (each in its own process)


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("trainer.loop").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.WARNING)


def offline_arm(cfg: Any, train: Sequence[Any], out: str) -> dict[str, Any]:
    """train_offline; the adapter goes to ``out``/adapter.  Time includes admission (reference forwards)."""
    _quiet()
    from bench.arms import fresh_learner
    from trainer.objectives.dpo import ADAPTER_DIR
    from trainer.offline import train_offline

    learner = fresh_learner(cfg)
    started = time.perf_counter()
    learner, res = train_offline(cfg, train, learner=learner, progress="offline arm")
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    learner.model.save_adapter(Path(out) / ADAPTER_DIR)
    return {"records": res.records, "steps": res.steps, "seconds": seconds, "records_per_s": res.records / seconds,
            "records_per_s_steps_only": res.records_per_s, "final_loss": res.losses[-1], "peak_rss_mb": peak,
            "checkpoint": out}


def _bf16(autocast: str) -> bool:
    """Whether ``autocast`` resolves to bf16 autocast on this machine's CPU (as the Learner decides)."""
    import torch

    from trainer.learner import uses_bf16_autocast

    return uses_bf16_autocast(autocast, torch.device("cpu"))


def trl_arm(cfg: Any, train: Sequence[Any], out: str) -> dict[str, Any]:
    """TRL's DPOTrainer on the same base, LoRA, settings and token ids; its adapter copied into our policy."""
    _quiet()
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from trainer.objectives import objective_for
    from trainer.objectives.dpo import ADAPTER_DIR

    class PreTokenizedDPOTrainer(DPOTrainer):
        """Takes prompt_ids/chosen_ids/rejected_ids as given (our policy's own tokenization)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001
            return dataset

    objective = objective_for(cfg)
    policy = objective.load(objective.resolved_base_model())  # our tokenization, and where the adapter goes
    rows = [trl_example(*(split_row(b.input_ids[i], b.attention_mask[i], b.response_mask[i]) for i in (0, 1)))
            for b in (policy.encode([r.prompt] * 2, [r.chosen, r.rejected]) for r in train)]
    data = Dataset.from_dict({k: [row[k] for row in rows] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    o, d = cfg.optim, cfg.dpo
    torch.manual_seed(o.seed)
    base = AutoModelForCausalLM.from_pretrained(policy.spec.base_model)
    lora = LoraConfig(r=d.lora_rank, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout,
                      target_modules=list(d.lora_target_modules), task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=o.batch_size, learning_rate=o.lr, num_train_epochs=o.epochs,
            warmup_steps=o.warmup_steps, lr_scheduler_type="constant_with_warmup", max_grad_norm=o.max_grad_norm,
            weight_decay=o.weight_decay, seed=o.seed, data_seed=o.seed, beta=d.beta, loss_type=["sigmoid"],
            max_length=None, disable_dropout=True, precompute_ref_log_probs=False, gradient_checkpointing=False,
            # The same precision as our arms: bf16 autocast (fp32 master weights) where ours resolves to it.
            bf16=_bf16(cfg.model.autocast), fp16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1000,
            dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = PreTokenizedDPOTrainer(model=base, args=args, train_dataset=data,
                                         processing_class=policy.tokenizer, peft_config=lora)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    state = get_peft_model_state_dict(trainer.model)
    set_peft_model_state_dict(policy.model, state)
    policy.save_adapter(Path(out) / ADAPTER_DIR)
    records = len(train) * o.epochs
    return {"records": records, "steps": trainer.state.global_step, "seconds": seconds,
            "records_per_s": records / seconds, "peak_rss_mb": peak, "checkpoint": out,
            "adapter_tensors": len(state)}


def streaming_arm(cfg: Any, train: Sequence[Any], out: str) -> dict[str, Any]:
    """run_in_process over the Kafka topic ``cfg.stream.topic`` already holding ``train``; the last checkpoint."""
    _quiet()
    from services.checkpoints import CheckpointStore
    from trainer.checkpointing import find_resume_point
    from trainer.objectives import objective_for
    from trainer.runtime import run_in_process

    started = time.perf_counter()
    summary = run_in_process(cfg)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    point = find_resume_point(cfg, CheckpointStore(cfg.checkpoint.checkpoint_url), None, objective=objective_for(cfg))
    if point.source != "checkpoint":
        raise RuntimeError(f"the streaming run left no checkpoint in {cfg.checkpoint.checkpoint_url}")
    return {"records": summary.records, "replayed": summary.replayed, "steps": summary.steps,
            "seconds": summary.seconds, "wall_seconds": seconds, "records_per_s": summary.records / summary.seconds,
            "stop_reason": summary.stop_reason, "peak_rss_mb": peak, "checkpoint": point.model_path}


def memory_streaming_arm(cfg: Any, train: Sequence[Any], out: str) -> dict[str, Any]:
    """The continual loop over an in-memory source (the fallback when Kafka cannot start)."""
    _quiet()
    from bench.arms import stream_phases
    from trainer.objectives.dpo import ADAPTER_DIR

    learner, stats = stream_phases(cfg, [train])
    peak = peak_rss_mb()
    learner.model.save_adapter(Path(out) / ADAPTER_DIR)
    return {**stats, "peak_rss_mb": peak, "checkpoint": out}


def ref_cache_arm(cfg: Any, train: Sequence[Any], steps: int) -> dict[str, Any]:
    """Median step time with cached reference log-probs vs recomputed every step, alternating."""
    _quiet()
    from bench.arms import fresh_learner

    learners = {"cached": fresh_learner(cfg), "recomputed": fresh_learner(cfg)}
    b = cfg.optim.batch_size
    batches = [list(train[i * b:(i + 1) * b]) for i in range(steps + 1)]
    times: dict[str, list[float]] = {k: [] for k in learners}
    for i, batch in enumerate(batches):
        names = list(learners) if i % 2 else list(learners)[::-1]  # who goes first alternates too
        for name in names:
            learner = learners[name]
            ids = {r.record_id for r in batch}
            if name == "cached":
                learner.admit(batch)  # as the trainer does when records arrive
            else:  # the cache emptied: batch() runs the reference forwards inside the step
                learner.objective.reference = {k: v for k, v in learner.objective.reference.items() if k not in ids}
            started = time.perf_counter()
            learner.train(batch)
            if i:  # the first batch warms both up, untimed
                times[name].append(time.perf_counter() - started)
    return {**speedup(times["cached"], times["recomputed"]), "steps": steps, "batch_size": b,
            "times_cached": times["cached"], "times_recomputed": times["recomputed"]}


def _in_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process (its own memory peak); load average around it."""
    load = os.getloadavg()[0]
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(fn, *args).result()
    result["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    log.info("%s: %s", fn.__name__, {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    return result


# ---------------------------------------------------------------------------------------- Kafka


class _Kafka:
    """A throwaway single-broker Kafka (KRaft) on free ports, and a fresh topic per streaming run."""

    def __init__(self, run_dir: Path) -> None:
        from services.stack import Stack, free_stack_config

        self.stack = Stack(free_stack_config(run_dir, components=("kafka",)))
        self.bootstrap = self.stack.up().kafka_bootstrap or ""

    def topic_with(self, records: Sequence[Any], partitions: int) -> str:
        """A fresh preference topic of ``partitions`` partitions holding ``records`` in this order."""
        from dataclasses import replace

        from services.kafka import make_producer
        from services.topics import PREFERENCES, ensure_topics, prefixed

        spec = replace(prefixed([PREFERENCES], f"bench-dpo-{uuid.uuid4().hex[:8]}.")[0], partitions=partitions)
        ensure_topics(self.bootstrap, [spec])
        producer = make_producer(self.bootstrap)
        try:
            for rec in records:
                producer.send(spec.name, value=rec.to_kafka(), key=rec.record_id.encode())
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)
        return spec.name

    def close(self) -> None:
        self.stack.down()


# ---------------------------------------------------------------------------------------- run


def _evaluate(evaluator: Any, policy: Any, test: Sequence[Any]) -> dict[str, Any]:
    res = evaluator.evaluate(policy, test)
    return {"accuracy": res.accuracy, "pairs": res.pairs, "mean_margin": res.mean_margin, **res.metrics}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.machine import describe
    from services.data import TEST_FILE, TRAIN_FILE, load_openpipe_jsonl, shared_data_dir
    from trainer.objectives import objective_for
    from trainer.offline import batches

    _quiet()
    s = _settings(args)
    cfg = _config(s)
    evaluator = objective_for(cfg)
    base = evaluator.load(evaluator.resolved_base_model())
    s["base_model"] = base.spec.base_model

    def fits(rec: Any) -> dict[int, str]:
        return base.rejections([rec.prompt] * rec.k, list(rec.ranked_responses))

    data = shared_data_dir()
    train_file = load_openpipe_jsonl(data / TRAIN_FILE)
    train = fitting_pairs(train_file, fits, s["train_records"])
    # The reference-cache steps need steps + 1 distinct batches (the first warms up), quick mode included.
    ref_pairs = fitting_pairs(train_file, fits, cfg.optim.batch_size * (s["ref_cache_steps"] + 1))
    test = fitting_pairs(load_openpipe_jsonl(data / TEST_FILE), fits, s["test_records"])
    s["train_records"], s["test_records"] = len(train), len(test)
    started = time.perf_counter()
    base_eval = _evaluate(evaluator, base, test)  # also fills the evaluator's reference cache for every arm
    log.info("untrained base: %s", base_eval)
    del base

    def judged(result: dict[str, Any]) -> dict[str, Any]:
        policy = evaluator.load(result["checkpoint"])
        ev = _evaluate(evaluator, policy, test)
        return {**result, **ev}

    kafka: _Kafka | None = None
    source, kafka_error = "memory", ""
    arms: dict[str, list[dict[str, Any]]] = {"offline": [], "streaming": [], "streaming_replay": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="prefstream-bench-dpo-") as tmp:
        if s["kafka"]:
            try:
                kafka = _Kafka(Path(tmp) / "stack")
                source = "kafka"
            except Exception as e:  # noqa: BLE001 - the fallback is reported in the result
                kafka_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("Kafka did not start, streaming from memory: %s", kafka_error)
        try:
            for seed in s["seeds"]:
                seeded = config_replace(cfg, seed=seed)
                order = [r for b in batches(train, cfg.optim.batch_size, seed) for r in b]
                out = str(Path(tmp) / f"offline-{seed}")
                arms["offline"].append(dict(judged(_in_process(offline_arm, seeded, train, out)), seed=seed))
                topic = kafka.topic_with(order, s["stream_partitions"]) if kafka is not None else ""
                # "streaming": one pass, as every other arm; "streaming_replay": the trainer's default replay on top.
                for arm, replay in (("streaming", {"replay_ratio": 0.0}), ("streaming_replay", {})):
                    looped = config_replace(seeded, **replay)
                    if kafka is not None:
                        streamed = config_replace(
                            looped, kafka_bootstrap=kafka.bootstrap, topic=topic, group_id=f"bench-dpo-{arm}-{seed}",
                            max_records=len(train), idle_exit_s=20.0, checkpoint_every_records=10 ** 6,
                            checkpoint_url=str(Path(tmp) / f"ckpt-{arm}-{seed}"), keep_checkpoints=0, eval_max_records=0)
                        run_s = _in_process(streaming_arm, streamed, order, "")
                    else:
                        run_s = _in_process(memory_streaming_arm, looped, order, str(Path(tmp) / f"{arm}-{seed}"))
                    arms[arm].append(dict(judged(run_s), seed=seed, replay_ratio=looped.stream.replay_ratio,
                                          replay_weight=looped.stream.replay_weight))
                if s["trl"]:
                    out = str(Path(tmp) / f"trl-{seed}")
                    arms["trl"].append(dict(judged(_in_process(trl_arm, seeded, train, out)), seed=seed))
        finally:
            if kafka is not None:
                kafka.close()
    ref = _in_process(ref_cache_arm, cfg, ref_pairs, s["ref_cache_steps"])
    offline, streaming = arm_summary(arms["offline"]), arm_summary(arms["streaming"])
    replayed = arm_summary(arms["streaming_replay"])
    trl = arm_summary(arms["trl"]) if arms["trl"] else None
    load = os.getloadavg()
    return {
        "accuracy_offline": offline["accuracy"],
        "accuracy_streaming": streaming["accuracy"],
        "accuracy_trl": trl["accuracy"] if trl else None,
        "accuracy_base": base_eval["accuracy"],
        "streaming_minus_offline": paired_diff(streaming["accuracy_per_seed"], offline["accuracy_per_seed"]),
        "accuracy_streaming_replay": replayed["accuracy"],
        "streaming_replay_minus_offline": paired_diff(replayed["accuracy_per_seed"], offline["accuracy_per_seed"]),
        "offline_minus_trl": paired_diff(offline["accuracy_per_seed"], trl["accuracy_per_seed"]) if trl else None,
        "streaming_source": source,
        "kafka_error": kafka_error or None,
        "seeds": s["seeds"],
        "records_per_s": offline["records_per_s"],
        "records_per_s_streaming": streaming["records_per_s"],
        "records_per_s_streaming_replay": replayed["records_per_s"],
        "records_per_s_trl": trl["records_per_s"] if trl else None,
        "speedup_vs_trl": offline["records_per_s"] / trl["records_per_s"] if trl else None,
        "ref_cache_speedup": ref["speedup"],
        "ref_cache": ref,
        "peak_rss_mb": offline["peak_rss_mb"],
        "peak_rss_mb_streaming": streaming["peak_rss_mb"],
        "peak_rss_mb_streaming_replay": replayed["peak_rss_mb"],
        "peak_rss_mb_trl": trl["peak_rss_mb"] if trl else None,
        "kl_to_ref": offline["kl_to_ref"],
        "kl_to_ref_trl": trl["kl_to_ref"] if trl else None,
        "kl_to_ref_streaming_replay": replayed["kl_to_ref"],
        "mean_words_base": base_eval.get("mean_words"),
        "mean_words_final": offline["mean_words"],
        "base_eval": base_eval,
        "offline": offline,
        "streaming": streaming,
        "streaming_replay": replayed,
        "trl": trl,
        "settings": s,
        "torch_threads": torch.get_num_threads(),
        "bench_seconds": time.perf_counter() - started,
        "load_avg_end": [round(x, 2) for x in load],
        "machine": describe(),
        "notes": _notes(s, source),
    }


def _notes(s: dict[str, Any], source: str) -> list[str]:
    return [
        f"pairs: the first {s['train_records']} training and {s['test_records']} test pairs of the HH files the "
        f"policy accepts at max_length={s['max_length']} (a long response is cut to its first tokens, the prompt "
        "from the left); the full size (four arms) ran in 44 min on a 2-core Xeon with AMX bf16 (autocast auto); "
        "the earlier full run on a 2-core EPYC (fp32, autocast none) took 25 min for 48 pairs",
        "accuracy_* are means over the seeds (each seed: its own LoRA initialisation and data order, shared by the "
        "arms); *_minus_* are paired per-seed differences with their standard error (None with one seed); one "
        f"seed's accuracy on {s['test_records']} pairs has a standard error of about sqrt(p(1-p)/N)",
        "accuracy_base: the untrained policy is its own reference, every implicit reward is exactly 0, every pair "
        "a tie, and ties count as wrong, so it is 0 by construction",
        "every arm is evaluated by DPOObjective.evaluate in the parent process (one evaluator, so the test pairs' "
        "reference log-probs are computed once); TRL's adapter weights are copied into our policy for that",
        "records_per_s is the offline arm's, admission (one reference forward per response) included; TRL's is "
        "trainer.train() (reference forward with the adapter disabled in every step, precompute_ref_log_probs="
        "False, its default); with one epoch both do one reference forward per response, so caching saves "
        "forwards only over replay and further epochs: ref_cache_speedup measures what a step saves",
        f"streaming: the continual loop through {source} (consumer group, admission with cached reference "
        "log-probs, the Learner step, a final checkpoint as a merged folder inside its time) with replay off, so "
        "it makes one pass over the pairs as every other arm does (the issue's 'same epochs'); streaming_replay: "
        "the same loop with the trainer's default replay (replay_ratio 0.5 at replay_weight 0.25: about 0.5 "
        "replayed record on top of every new one), which is what it runs in production to keep earlier data learnt, "
        "and on a stream that does not shift amounts to part of a second epoch",
        f"the streaming topic has {s['stream_partitions']} partition(s) and gets the records in the offline arm's "
        "batch order; with 1 the trainer sees that order, so the arms differ in the machinery only; a 4-partition "
        "topic interleaves the records by key, and which records share a step then moves the accuracy by several "
        "points (docs/trainer.md)",
        "TRL gets our policy's own token ids (chat template, response up to its EOS, cut keep_start) "
        "pre-tokenized; each pair's prompt is the shorter of our two left-truncated cuts, so TRL sees at most as "
        "much context as our arms",
        f"autocast {s['autocast']} for every arm (TRL: bf16={_bf16(s['autocast'])}, fp32 master weights in both); our "
        "reference log-probs are computed at admission under the same autocast as the step",
        "ema_decay 0 for our arms (TRL has no weight averaging): the last iterate is evaluated everywhere",
        "peak_rss_mb*: ru_maxrss of each arm's own spawned process right after training (before evaluation)",
        "the machine is shared with other helpers' tests and benchmarks: see each run's load_avg_1m and "
        "load_avg_end; the ref-cache arms alternate step by step, so their ratio is load-robust, the arms' "
        "records_per_s are not",
    ]
