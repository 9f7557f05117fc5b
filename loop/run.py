"""``prefstream loop criteria``: teach the policy a criterion on the real stack, and measure it.

prompts --best-of-N with the criterion (OpenAI route, ``store: true``)--> gateway --completion and its
criteria feedback--> Kafka --> processor --criteria preference pairs--> policy trainer (continual DPO)
--gated versions--> registry --> scorer hot swap --> the next best-of-N samples from the better policy.

Beside it the loop measures what a user came for: the *served* policy's own violation rate (n = 1, a
fixed seed per prompt, on held-out prompts never trained on) right after every version it publishes,
each reply decoded alone while the app's requests wait (``eval_alone``), so measuring one version
twice gives one number, with the reward model's score of the same replies, their length and the
gate's KL to the reference.
Criteria are taught one after another (phases, each optionally keeping the earlier phases' criteria in
its ranking) or together; after the last phase it reports how
much of each earlier criterion's gain survived, and how often a reward model prefers the final
policy's reply to the base policy's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import aiohttp

from loop.config import LoopConfig
from loop.pacing import Pacer, Quiet, TrainerBacklog
from loop.prompts import (PromptPlan, conversation, load_prompts, mean_words, plan_prompts, retention, violated,
                          win_rate, word_spread)
from services.checkpoints import CheckpointStore
from services.config import env_vars
from services.criteria import Criterion, parse_criterion, split_ref
from services.criteria_eval import FEEDBACK_MODE_SUMMARIES, CriterionResult, evaluate
from services.criteria_store import CriteriaStore
from services.data import TEST_FILE, TRAIN_FILE, shared_data_dir
from services.endpoints import load_stack_endpoints
from services.redis_client import connect
from services.registry import ModelRegistry
from services.stack import ServiceProcess, Stack, check_running, free_port, open_run_stack, stop_run
from trainer.guard_set import GuardPrompt, write_guard_set

log = logging.getLogger(__name__)

#: Header of the OpenAI-compatible route that names the criteria of a best-of-N (JSON list of refs).
CRITERIA_HEADER = "op-criteria"
#: Evaluation requests in flight without eval_alone: the scorer decodes concurrent generations as one
#: batch (a step over 16 rows costs about twice one over 1 row on a CPU), so the held-out prompts go in
#: together.  With it, they go as GenerateBatch calls, decoded as a batch of their own: the same version
#: gives the same replies each time (docs/scorer.md).
EVAL_CONCURRENCY = 16
#: Held-out prompts per GenerateBatch when the evaluation runs alone (the scorer's max_generate_batch), and
#: how long one such batch may take.
EVAL_BATCH = 64
EVAL_BATCH_TIMEOUT_S = 900.0
#: how often the end of a phase reads the registry while it waits for the trainer (seconds)
DRAIN_POLL_S = 2.0
#: how many times an evaluation that a hot swap split between two versions is taken again (then it is kept, mixed)
MIXED_RETRIES = 3
#: Per-call deadline of the loop's scorer calls (a generation waits behind the app's best-of-N
#: requests) and of the app's calls to the gateway, longer than the gateway's own wait for the scorer
#: (``scorer_timeout_s``), so a slow best-of-N is reported with the gateway's 504 and its reason.
SCORER_TIMEOUT_S = 600.0


def _out(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# What the loop records.


@dataclass
class Evaluation:
    """The served policy measured once on the held-out prompts."""

    t: float  # seconds since the loop started
    phase: int
    version: str  # the version that answered (the majority, when a swap happened mid-way)
    versions: dict[str, int]  # version -> replies it produced
    violation: dict[str, float]  # criterion ref -> violation rate
    mean_words: float
    mean_reward: float | None
    kl_to_ref: float | None
    words: dict[str, float] = field(default_factory=dict)  # p10, p50, p90 of the replies' word counts
    #: share of the replies that max_tokens cut off (they ran on instead of ending; None: not known)
    cut_off: float | None = None
    eval_s: float | None = None  # seconds the measurement took (held traffic and all, when alone)
    #: a digest of the replies in prompt order: two measurements of one version that agree on it wrote
    #: the same text (what eval_alone promises), and where they differ it shows that they did not
    replies_digest: str = ""
    replies: list[str] = field(repr=False, default_factory=list)
    rewards: list[float] = field(repr=False, default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("replies", "rewards")}


@dataclass
class VersionCounts:
    """What the best-of-N requests one served policy version answered looked like."""

    requests: int = 0
    candidates: int = 0
    passing: int = 0  # candidates that met every criterion of the request
    mixed: int = 0  # requests with passing and failing candidates: the ones whose pair teaches the rule

    def row(self) -> dict[str, Any]:
        return {**self.__dict__, "passing_share": self.passing / self.candidates if self.candidates else None,
                "mixed_share": self.mixed / self.requests if self.requests else None}


@dataclass
class Counters:
    sent: int = 0
    failed: int = 0
    gate_prompts: int = 0
    errors: list[str] = field(default_factory=list)
    per_version: dict[str, VersionCounts] = field(default_factory=dict)

    # Totals are sums over the served versions, never kept twice.
    @property
    def stored(self) -> int:
        return sum(v.requests for v in self.per_version.values())

    @property
    def candidates(self) -> int:
        return sum(v.candidates for v in self.per_version.values())

    @property
    def candidates_passing(self) -> int:
        return sum(v.passing for v in self.per_version.values())

    def answered(self, version: str, passed: Sequence[bool]) -> None:
        """Count one stored best-of-N: its candidates' pass/fail under the request's criteria."""
        v = self.per_version.setdefault(version or "base", VersionCounts())
        v.requests += 1
        v.candidates += len(passed)
        v.passing += sum(passed)
        v.mixed += 0 < sum(passed) < len(passed)


# ---------------------------------------------------------------------------------------------
# Set-up: criteria, the reward model, the services.


def resolve_criteria(store: CriteriaStore, refs: Sequence[str], project: str) -> list[Criterion]:
    """Each entry a stored criterion (name or name@version) or a YAML/JSON file created in the store."""
    out = []
    for i, ref in enumerate(refs):
        where = f"criteria[{i}]"
        if ref.endswith((".yaml", ".yml", ".json")):
            path = Path(ref)
            if not path.is_file():
                from services.errors import InvalidArgument

                raise InvalidArgument(where, f"{ref} is not a file; give a criterion definition file or a stored name")
            from services.criteria_cli import read_definitions

            for definition in read_definitions(str(path)):
                criterion, created = store.create(parse_criterion(definition, project=project))
                _out(f"criterion {criterion.ref} {'created' if created else 'unchanged'} from {path}")
                out.append(criterion)
        else:
            split_ref(ref, where)  # names the entry when it is not a valid name or name@version
            out.append(store.get(project, ref))
    return out


def feedback_mode_for(dpo_loss: str, pairing: str = "pair") -> str:
    """What criteria feedback the policy's loss trains on: the whole ranking for Plackett-Luce, else
    the pairs ``pairing`` names (sigmoid and IPO read two replies a record; see LoopConfig.pairing)."""
    if dpo_loss == "plackett_luce":
        return "ranking"
    return pairing


class FeedbackModes:
    """The loop's criteria build the feedback its loss needs for as long as it runs, then get back
    whatever explicit setting they had (or none)."""

    def __init__(self, store: CriteriaStore, criteria: Sequence[Criterion], dpo_loss: str,
                 pairing: str = "pair") -> None:
        self.store, self.criteria, self.mode = store, list(criteria), feedback_mode_for(dpo_loss, pairing)
        self.before: dict[tuple[str, str], dict[str, Any] | None] = {}

    def __enter__(self) -> "FeedbackModes":
        for c in self.criteria:  # every check before any change: a refused run changes nothing
            if self.store.feedback_mode(c.project, [c.name]) is None:
                from services.errors import InvalidArgument

                raise InvalidArgument("criteria", f"criteria feedback is switched off for {c.ref} in project "
                                      f"{c.project}, so the loop would train on nothing; switch it on with "
                                      f"`prefstream criteria feedback on --name {c.name} --project {c.project}`")
        for c in self.criteria:
            self.before[(c.project, c.name)] = self.store.feedback_settings(c.project).get(c.name)
            self.store.set_feedback(c.project, c.name, enabled=True, mode=self.mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        for (project, name), old in self.before.items():
            if old is None:
                self.store.clear_feedback(project, name)
            else:
                self.store.set_feedback(project, name, enabled=old.get("enabled", True), mode=old.get("mode", "pair"))


def reward_checkpoint(cfg: LoopConfig) -> Path | None:
    """The reward model folder to publish: given, or trained once on ``reward_data`` and cached."""
    if not cfg.reward_model or not cfg.reward_checkpoint:
        return None
    if cfg.reward_checkpoint != "auto":
        return Path(cfg.reward_checkpoint)
    from loop.reward import cached_reward_model

    return cached_reward_model(cfg.reward_data or str(shared_data_dir() / TRAIN_FILE), say=_out)


class LoopProcesses:
    """The stack, the three deployables and the clients of one loop run."""

    def __init__(self, cfg: LoopConfig, guard_prompts: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.stack: Stack | None = None
        self.services: list[ServiceProcess] = []
        self.guard_prompts = tuple(guard_prompts)
        #: the gate's own guard set (trainer/guard_set.py), when the plan set prompts aside for it
        self.guard_set: Path | None = None

    def start(self) -> None:
        cfg = self.cfg
        self.stack, self.stack_dir = open_run_stack(self.run_dir, stack_run_dir=cfg.stack_run_dir, fresh=cfg.fresh,
                                                    say=_out)
        self.endpoints = load_stack_endpoints(self.stack_dir)
        self.redis = connect(self.endpoints.redis_url)
        if self.guard_prompts:  # the trainer reads it from its start; each phase names its criteria there
            self.guard_set = self.run_dir / "guard_set.jsonl"
            self.name_guard_criteria(())
        self.checkpoints = self.run_dir / "checkpoints"
        if cfg.topic_prefix:
            from services.topics import TOPICS, ensure_topics, prefixed

            ensure_topics(self.endpoints.kafka_bootstrap, prefixed(TOPICS, cfg.topic_prefix))
        folder = reward_checkpoint(cfg)
        if folder is not None:
            from loop.reward import publish_reward_model

            version = publish_reward_model(folder, name=cfg.reward_model, checkpoint_url=str(self.checkpoints),
                                           redis_url=self.endpoints.redis_url)
            _out(f"reward model {cfg.reward_model}@{version} published from {folder}")
        logs = self.run_dir / "logs"
        gw_port, gw_http, sc_port = free_port(), free_port(), free_port()
        self.trainer_metrics_port = free_port()
        common = {"PREFSTREAM_STACK_RUN_DIR": str(self.stack_dir)}
        if cfg.topic_prefix:
            common.update({f"PREFSTREAM_{svc}_TOPIC_PREFIX": cfg.topic_prefix for svc in ("GATEWAY", "SCORER", "TRAINER")})
        scorer = ServiceProcess("scorer", "scorer", {
            **common,
            "PREFSTREAM_SCORER_STACK_RUN_DIR": str(self.stack_dir),
            "PREFSTREAM_SCORER_PORT": str(sc_port),
            "PREFSTREAM_SCORER_POLL_INTERVAL_S": "0.5",
            "PREFSTREAM_SCORER_REWARD_MODELS": cfg.reward_model or "reward",
            "PREFSTREAM_SCORER_POLICY_MODELS": cfg.policy_model,
            "PREFSTREAM_SCORER_MAX_NEW_TOKENS": str(max(cfg.max_tokens, 16)),
            "PREFSTREAM_SCORER_DEFAULT_NEW_TOKENS": str(max(cfg.max_tokens, 16)),
            "PREFSTREAM_SCORER_MAX_LENGTH": str(cfg.max_length),
            **({"PREFSTREAM_SCORER_POLICY_BASE_PATH": cfg.policy_base} if cfg.policy_base else {}),
        }, logs / "scorer.log")
        gateway = ServiceProcess("gateway", "gateway", {
            **common,
            "PREFSTREAM_GATEWAY_STACK_RUN_DIR": str(self.stack_dir),
            "PREFSTREAM_GATEWAY_GRPC_PORT": str(gw_port),
            "PREFSTREAM_GATEWAY_HTTP_PORT": str(gw_http),
            "PREFSTREAM_GATEWAY_SCORER_ADDRESS": f"127.0.0.1:{sc_port}",
        }, logs / "gateway.log")
        trainer = ServiceProcess("trainer", "trainer", {
            **common,
            **env_vars("trainer", self.trainer_leaves()),
        }, logs / "trainer.log")
        self.services = [scorer, gateway, trainer]
        for s in self.services:
            s.start()
        _out(f"services starting; logs in {logs}")
        gateway.wait_grpc(f"127.0.0.1:{gw_port}", cfg.startup_timeout_s)
        scorer.wait_grpc(f"127.0.0.1:{sc_port}", cfg.startup_timeout_s)
        self.scorer_address = f"127.0.0.1:{sc_port}"
        self.http_base = f"http://127.0.0.1:{gw_http}"
        from gateway.auth import create_key
        from gateway.config import load_gateway_config

        gw_cfg = load_gateway_config(overrides={"stack_run_dir": str(self.stack_dir)})
        self.api_key, _ = create_key(self.redis, cfg.project, pepper=gw_cfg.auth_pepper, label="loop")

    def name_guard_criteria(self, refs: Sequence[str]) -> None:
        """(Re)write the gate's guard set: its prompts, each naming the criteria ``refs`` the criteria guard
        judges the replies by (the trainer reads the file again at every evaluation)."""
        if self.guard_set is None:
            return
        cfg = self.cfg
        write_guard_set(self.guard_set, [GuardPrompt.make(conversation(p, cfg.system_prompt), cfg.project, tuple(refs))
                                         for p in self.guard_prompts])

    def trainer_leaves(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "stack_run_dir": self.stack_dir, "model_kind": "policy", "model_name": cfg.policy_model,
            "checkpoint_url": self.checkpoints, "checkpoint_every_records": cfg.checkpoint_every_records,
            "checkpoint_every_s": 0, "lr": cfg.lr, "beta": cfg.beta, "dpo_loss": cfg.dpo_loss,
            "sft_weight": cfg.sft_weight, "stop_anchor": cfg.stop_anchor,
            "stop_anchor_sides": cfg.stop_anchor_sides, "label_smoothing": cfg.label_smoothing, "temperature": cfg.trainer_temperature,
            "finetune": cfg.finetune, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
            "lora_target_modules": cfg.lora_target_modules,
            "batch_size": cfg.batch_size, "max_tokens_per_backward": cfg.max_tokens_per_backward,
            "replay_ratio": cfg.replay_ratio, "replay_weight": cfg.replay_weight, "max_kl": cfg.max_kl,
            "max_length": cfg.max_length, "max_response_tokens": cfg.max_tokens + 8, "autocast": "auto",
            "ema_decay": 0.0, "warmup_steps": cfg.warmup_steps, "seed": cfg.seed, "keep_checkpoints": 1000,
            "max_shrink": cfg.max_shrink, "guard_max_new_tokens": cfg.guard_max_new_tokens,
            "guard_prompts": cfg.guard_prompts, "max_reward_drop": cfg.max_reward_drop,
            "max_reward_giveback": cfg.max_reward_giveback,
            "guard_temperature": cfg.eval_temperature, "criteria_guard": cfg.criteria_guard,
            "max_violation_rise": cfg.max_violation_rise, "max_violation_giveback": cfg.max_violation_giveback,
            "min_guard_prompts": cfg.min_guard_prompts, "rollback_lr_factor": cfg.rollback_lr_factor,
            "doubt_z": cfg.doubt_z,
            "reward_guard": cfg.reward_model if cfg.reward_guard else "",
            **({"guard_set": str(self.guard_set)} if self.guard_set else {}),
            "ray_storage_path": self.run_dir / "ray_train",
            "metrics_port": self.trainer_metrics_port,
            **({"base_model": cfg.policy_base} if cfg.policy_base else {}),
        }

    def trainer_backlog(self) -> TrainerBacklog:
        """The policy trainer's unconsumed records on this run's preference topic (loop/pacing.py)."""
        from services.topics import PREFERENCES, topic_name

        return TrainerBacklog(self.endpoints.kafka_bootstrap, topic_name(PREFERENCES, self.cfg.topic_prefix),
                              f"http://127.0.0.1:{self.trainer_metrics_port}/metrics")

    def check(self) -> None:
        check_running(self.services)

    def stop(self) -> None:
        stop_run(self.services, self.stack, keep_stack=self.cfg.keep_stack)


# ---------------------------------------------------------------------------------------------
# The run.


class CriteriaLoop:
    def __init__(self, cfg: LoopConfig, procs: LoopProcesses, criteria: list[Criterion], plan: PromptPlan) -> None:
        self.cfg = cfg
        self.procs = procs
        self.criteria = criteria
        self.plan = plan
        self.t0 = time.time()
        self.counters = Counters()
        self.evaluations: list[Evaluation] = []
        self.phase = 0
        self.phase_marks: list[tuple[float, str]] = []  # (t, label) where each phase began
        self.registry = ModelRegistry(procs.redis)
        self._evaluated: set[str] = set()
        self._measuring = asyncio.Lock()  # the evaluator's and the phase end's measurements, one at a time
        self.pacer: Pacer | None = None
        self.quiet = Quiet()  # evaluations decoded alone (eval_alone): the app's best-of-N waits meanwhile
        self._backlog: TrainerBacklog | None = None
        if cfg.max_backlog > 0:
            self._backlog = procs.trainer_backlog()
            self.pacer = Pacer(cfg.max_backlog, self._backlog.read)

    # -- the served policy, measured ----------------------------------------------------------

    async def _generate_eval(self, scorer: Any) -> tuple[list[str], dict[str, int], float]:
        """The served policy's replies to the held-out prompts, the versions that wrote them, and the share
        of replies ``max_tokens`` cut off."""
        from scorer.decoding import LENGTH
        from scorer.domain import SamplingParams
        from scorer.generation import GenerateQuery

        queries = [GenerateQuery(messages=conversation(prompt, self.cfg.system_prompt), model=self.cfg.policy_model,
                                 sampling=SamplingParams(temperature=self.cfg.eval_temperature,
                                                         max_tokens=self.cfg.max_tokens, seed=self.cfg.seed + i))
                   for i, prompt in enumerate(self.plan.eval_prompts)]
        if self.cfg.eval_alone:  # one batch of their own (GenerateBatch): the same version, the same replies
            results = [res for start in range(0, len(queries), EVAL_BATCH)
                       for res in await scorer.generate_batch(queries[start:start + EVAL_BATCH],
                                                              timeout_s=EVAL_BATCH_TIMEOUT_S)]
        else:
            sem = asyncio.Semaphore(EVAL_CONCURRENCY)

            async def one(q: GenerateQuery) -> Any:
                async with sem:
                    return await scorer.generate(q.messages, model=q.model, sampling=q.sampling)

            results = await asyncio.gather(*(one(q) for q in queries))
        versions = dict(collections.Counter(r.model.version for r in results))
        cut = sum(r.choices[0].finish_reason == LENGTH for r in results)
        return [r.choices[0].text for r in results], versions, cut / len(results)

    async def _rewards(self, scorer: Any, replies: Sequence[str]) -> list[float]:
        if not self.cfg.reward_model:
            return []
        sem = asyncio.Semaphore(self._eval_concurrency)

        async def one(prompt: str, reply: str) -> float:
            async with sem:
                res = await scorer.score([m.to_dict() for m in conversation(prompt, self.cfg.system_prompt)], [reply],
                                         model=self.cfg.reward_model)
                return res.scores[0].reward

        return list(await asyncio.gather(*(one(p, r) for p, r in zip(self.plan.eval_prompts, replies))))

    async def judge(self, scorer: Any, replies: Sequence[str]) -> dict[str, list[CriterionResult]]:
        """Every criterion's result on every eval reply: rules here, model-backed ones through the scorer."""
        out: dict[str, list[CriterionResult]] = {}
        for c in self.criteria:
            if c.kind == "rules":
                out[c.ref] = [evaluate(c, (), [r])[0] for r in replies]
                continue
            results = []
            for prompt, reply in zip(self.plan.eval_prompts, replies):
                res = await scorer.best_of_n(
                    [m.to_dict() for m in conversation(prompt, self.cfg.system_prompt)], candidates=[reply],
                    criteria_refs=[c.ref])
                results.append(res.ranked[0].criteria_results[c.name])
            out[c.ref] = results
        return out

    @property
    def _eval_concurrency(self) -> int:
        return 1 if self.cfg.eval_alone else EVAL_CONCURRENCY

    async def evaluate_served(self, scorer: Any, label: str) -> Evaluation:
        started = time.time()
        async with self.quiet.alone() if self.cfg.eval_alone else contextlib.nullcontext():
            replies, versions, cut_off = await self._generate_eval(scorer)
            for _ in range(MIXED_RETRIES):  # a hot swap mid-way: a reading of two versions is one of neither
                if len(versions) == 1:
                    break
                _out(f"a version was swapped in during the evaluation ({versions}); measuring the served one again")
                replies, versions, cut_off = await self._generate_eval(scorer)
            results = await self.judge(scorer, replies)
            rewards = await self._rewards(scorer, replies)
        version = max(versions, key=versions.get)
        kl = None
        if version != "base":
            try:
                kl = self.registry.get(self.cfg.policy_model, version).metrics.get("kl_to_ref")
            except Exception:  # noqa: BLE001 - a missing metric is shown as such
                kl = None
        ev = Evaluation(t=round(time.time() - self.t0, 1), phase=self.phase, version=version, versions=versions,
                        violation={ref: sum(violated(r) for r in rs) / len(rs) for ref, rs in results.items()},
                        mean_words=mean_words(replies), words=word_spread(replies), cut_off=cut_off,
                        mean_reward=(sum(rewards) / len(rewards)) if rewards else None, kl_to_ref=kl,
                        replies=replies, rewards=rewards, eval_s=round(time.time() - started, 1),
                        replies_digest=replies_digest(replies))
        self.evaluations.append(ev)
        self._evaluated.add(version)
        rates = ", ".join(f"{ref} {v:.2f}" for ref, v in ev.violation.items())
        _out(f"[{ev.t:6.0f}s] eval {label}: policy {version} violation {rates}; {ev.mean_words:.0f} words"
             + _spread(ev.words) + f", {ev.cut_off:.2f} cut off by max_tokens"
             + (f"; reward {ev.mean_reward:.3f}" if ev.mean_reward is not None else "")
             + (f"; KL {kl:.3f}" if kl is not None else "") + f"; {ev.eval_s:.0f}s"
             + (" alone" if self.cfg.eval_alone else ""))
        return ev

    # -- the app: best-of-N with the criteria, stored ---------------------------------------------

    async def _best_of_n(self, http: aiohttp.ClientSession, prompt: str, refs: list[str], split: str) -> None:
        body = {
            "model": self.cfg.policy_model, "n": self.cfg.candidates, "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens, "store": True,
            "messages": [m.to_dict() for m in conversation(prompt, self.cfg.system_prompt)],
            "metadata": {"prefstream.split": split, "prefstream.loop": "criteria"},
        }
        headers = {"Authorization": f"Bearer {self.procs.api_key}", CRITERIA_HEADER: json.dumps(refs)}
        self.counters.sent += 1
        try:
            async with self.quiet.request(), http.post(
                    f"{self.procs.http_base}/v1/chat/completions", json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=SCORER_TIMEOUT_S)) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data}")
        except Exception as e:  # noqa: BLE001 - counted and reported: the loop must not hide a failure
            self.counters.failed += 1
            if len(self.counters.errors) < 5:
                self.counters.errors.append(f"{type(e).__name__}: {e}"[:300])
            return
        self.counters.answered(data.get("model_version", ""), [
            all(r.get("passed", r.get("score", 0) >= 0.5) for r in (choice.get("criteria_results") or {}).values())
            for choice in data.get("choices", [])])

    async def _send_phase(self, http: aiohttp.ClientSession, prompts: Sequence[str], refs: list[str],
                          deadline: float) -> int:
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for i, p in enumerate(prompts):
            queue.put_nowait((i, p))
        sent = 0
        hold = asyncio.Lock()

        async def worker() -> None:
            nonlocal sent
            while time.time() < deadline:
                async with hold:  # one worker polls the backlog; the others queue behind it
                    await self._hold_while_behind(deadline)
                try:
                    i, p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                split = "test" if self.cfg.gate_every and i % self.cfg.gate_every == self.cfg.gate_every - 1 else "train"
                self.counters.gate_prompts += split == "test"
                await self._best_of_n(http, p, refs, split)
                sent += 1

        await asyncio.gather(*(worker() for _ in range(self.cfg.concurrency)))
        return sent

    async def _hold_while_behind(self, deadline: float) -> None:
        """Wait while the policy trainer has max_backlog or more records it has not consumed (loop/pacing.py)."""
        pacer = self.pacer
        if pacer is None:
            return
        started = time.time()
        while time.time() < deadline and await asyncio.to_thread(pacer.should_hold):
            await asyncio.sleep(pacer.every_s)
        pacer.held_s += time.time() - started

    # -- versions ---------------------------------------------------------------------------------

    def versions(self) -> tuple[list[str], list[tuple[str, str]]]:
        from services.registry import ModelNotFound

        try:
            vs = self.registry.versions(self.cfg.policy_model, include_rejected=True)
        except ModelNotFound:  # the trainer has not written its first version yet
            return [], []
        published = [v.version for v in vs if v.state.value == "published"]
        rejected = [(v.version, v.reason) for v in vs if v.state.value == "rejected"]
        return published, rejected

    def gate_metrics(self) -> dict[str, dict[str, Any]]:
        """What the policy gate measured of each version it judged (its guards' numbers), and its verdict."""
        from services.registry import ModelNotFound

        try:
            vs = self.registry.versions(self.cfg.policy_model, include_rejected=True)
        except ModelNotFound:
            return {}
        return {v.version: {"state": v.state.value, **{k: round(x, 4) for k, x in v.metrics.items()}} for v in vs}

    async def _wait_served(self, scorer: Any, version: str, timeout_s: float = 120.0) -> bool:
        from scorer.domain import SamplingParams

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            res = await scorer.generate([{"role": "user", "content": "hi"}], model=self.cfg.policy_model,
                                        sampling=SamplingParams(temperature=0.0, max_tokens=1))
            if res.model.version == version:
                return True
            await asyncio.sleep(1.0)
        return False

    async def _evaluator(self, scorer: Any, stop: asyncio.Event) -> None:
        """After every newly published version: wait until it is served, then measure it.  When versions
        come faster than an evaluation takes, the newest is measured and the ones between are skipped."""
        while not stop.is_set():
            published, _ = self.versions()
            newest = published[-1] if published else None
            if newest is not None and newest not in self._evaluated:  # older unmeasured ones are superseded
                async with self._measuring:
                    if newest in self._evaluated:  # the end of the phase measured it meanwhile
                        continue
                    if await self._wait_served(scorer, newest):
                        await self.evaluate_served(scorer, f"after {newest}")
                    else:
                        self._evaluated.add(newest)
                        _out(f"version {newest} was published but not served within 120 s; not measured")
                continue
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass

    async def _progress(self, stop: asyncio.Event, total: int) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.progress_every_s)
            except asyncio.TimeoutError:
                pass
            self.procs.check()
            published, rejected = self.versions()
            c = self.counters
            last = self.evaluations[-1] if self.evaluations else None
            rate = "" if last is None else " | served " + last.version + " " + ", ".join(
                f"{k.split('@')[0]} {v:.2f}" for k, v in last.violation.items())
            share = f"{c.candidates_passing / c.candidates:.2f}" if c.candidates else "-"
            behind = "" if self.pacer is None or self.pacer.last is None else (
                f", trainer backlog {self.pacer.last} (held {self.pacer.held_s:.0f}s)")
            _out(f"[{time.time() - self.t0:6.0f}s] phase {self.phase + 1}: {c.sent}/{total} best-of-N sent "
                 f"({c.failed} failed, {c.gate_prompts} for the gate), candidates passing {share}{behind}; "
                 f"policy versions {len(published)} published / {len(rejected)} rejected{rate}")

    async def run(self) -> dict[str, Any]:
        from scorer.client import ScorerClient

        cfg = self.cfg
        phases = phase_criteria(self.criteria, together=cfg.together, keep_earlier=cfg.keep_earlier)
        async with ScorerClient(self.procs.scorer_address, timeout_s=SCORER_TIMEOUT_S) as scorer, \
                aiohttp.ClientSession() as http:
            await scorer.wait_ready(cfg.startup_timeout_s)
            base = await self.evaluate_served(scorer, "of the base policy")
            stop = asyncio.Event()
            evaluator = asyncio.create_task(self._evaluator(scorer, stop))
            progress = asyncio.create_task(self._progress(stop, self.plan.train_prompts))
            ends: list[Evaluation] = []
            try:
                for k, taught in enumerate(phases):
                    self.phase = k
                    refs = [c.ref for c in taught]
                    # the gate judges every criterion taught so far, so a later phase does not give back an earlier one
                    self.procs.name_guard_criteria(list(dict.fromkeys(c.ref for p in phases[:k + 1] for c in p)))
                    self.phase_marks.append((time.time() - self.t0, " + ".join(refs)))
                    _out(f"phase {k + 1}/{len(phases)}: teaching {' + '.join(refs)} with "
                         f"{len(self.plan.phases[k])} prompts (best-of-{cfg.candidates})")
                    published_before = len(self.versions()[0])
                    await self._send_phase(http, self.plan.phases[k], refs, time.time() + cfg.phase_s)
                    await self._drain(published_before)
                    ends.append(await self._final_of_phase(scorer))
            finally:
                stop.set()
                await asyncio.gather(evaluator, progress, return_exceptions=True)
                if self._backlog is not None:  # closing the Kafka consumer blocks: off the event loop
                    await asyncio.to_thread(self._backlog.close)
            final = ends[-1]
            rewards_base = base.rewards
            quality = win_rate(final.rewards, rewards_base) if final.rewards and rewards_base else None
        return self.summary(base, ends, quality)

    async def _drain(self, published_before: int) -> None:
        """Wait for the trainer to publish what the phase taught (at least min_versions new versions, or
        nothing new for a while once the topic is drained), for up to drain_timeout_s; then, while a
        checkpoint the trainer wrote still waits for the gate's verdict, up to drain_timeout_s more, so
        the phase's last version is the one its end measures (on a 2-core Xeon the gate took 150 s over a
        checkpoint, and a phase ended, and was measured, on the version before it)."""
        deadline = time.time() + self.cfg.drain_timeout_s
        cap = deadline + self.cfg.drain_timeout_s
        last_change, last = time.time(), self.versions()
        while time.time() < cap:
            now = self.versions()
            if now != last:
                last, last_change = now, time.time()
            if len(now[0]) - published_before >= max(1, self.cfg.min_versions) and time.time() - last_change > 20:
                return
            if time.time() >= deadline and not await asyncio.to_thread(self.awaiting_verdict, now):
                return
            await asyncio.sleep(DRAIN_POLL_S)

    def awaiting_verdict(self, versions: tuple[list[str], list[tuple[str, str]]]) -> list[str]:
        """Policy checkpoints the trainer has written (manifest last) on which the gate has no verdict in
        ``versions`` (:meth:`versions`' published and rejected)."""
        published, rejected = versions
        judged = set(published) | {v for v, _ in rejected}
        written = CheckpointStore(str(self.procs.checkpoints)).list(self.cfg.policy_model)
        return [r.version for r in written if r.version not in judged]

    async def _final_of_phase(self, scorer: Any) -> Evaluation:
        # Behind a measurement the evaluator has begun, which may be of this very version: measured
        # alone, a second reading of it would only repeat the first (a 2-3 minute wait for nothing).
        async with self._measuring:
            published, _ = self.versions()
            newest = published[-1] if published else "base"
            last = self.evaluations[-1] if self.evaluations else None
            if last is not None and last.versions == {newest: len(last.replies)} and last.phase == self.phase:
                return last
            if newest != "base":
                await self._wait_served(scorer, newest)
            return await self.evaluate_served(scorer, f"at the end of phase {self.phase + 1}")

    def summary(self, base: Evaluation, ends: list[Evaluation], quality: float | None) -> dict[str, Any]:
        published, rejected = self.versions()
        first = self.criteria[0].ref
        final = ends[-1]
        vb, vf = base.violation[first], final.violation[first]
        kept = None
        if len(ends) >= 2 and not self.cfg.together:
            kept = retention(vb, ends[0].violation[first], vf)
        out: dict[str, Any] = {
            "criterion": first,
            "criteria": [c.ref for c in self.criteria],
            "violation_rate_base": vb,
            "violation_rate_final": vf,
            "relative_reduction": (1 - vf / vb) if vb > 0 else None,
            "violation_rates_base": base.violation,
            "violation_rates_after_each_phase": [e.violation for e in ends],
            "first_criterion_retention": None if kept is None or math.isnan(kept) else kept,
            "quality_win_rate_vs_base": quality,
            "eval_prompts": len(self.plan.eval_prompts),
            "train_prompts": self.plan.train_prompts,
            "best_of_n_sent": self.counters.sent,
            "best_of_n_stored": self.counters.stored,
            "gate_prompts": self.counters.gate_prompts,
            "guard_set_prompts": len(self.plan.guard_prompts),
            "candidates_passing_share": (self.counters.candidates_passing / self.counters.candidates
                                         if self.counters.candidates else None),
            "candidates_per_version": {v: c.row() for v, c in self.counters.per_version.items()},
            "max_backlog": self.cfg.max_backlog,
            "held_for_trainer_s": None if self.pacer is None else round(self.pacer.held_s, 1),
            "held_for_evaluation_s": round(self.quiet.held_s, 1),
            "peak_trainer_backlog": None if self.pacer is None else self.pacer.peak,
            "versions_published": len(published),
            "versions_rejected": len(rejected),
            "rejections": [f"{v}: {why}" for v, why in rejected][:10],
            "gate_metrics": self.gate_metrics(),
            "failed_requests": self.counters.failed,
            "errors": self.counters.errors,
            "kl_to_ref": final.kl_to_ref,
            "mean_words_base": base.mean_words,
            "mean_words_final": final.mean_words,
            "words_spread_base": base.words,
            "words_spread_final": final.words,
            "cut_off_base": base.cut_off,
            "cut_off_final": final.cut_off,
            "mean_reward_base": base.mean_reward,
            "mean_reward_final": final.mean_reward,
            "final_version": final.version,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.cfg.__dict__.items()},
            "evaluations": [e.row() for e in self.evaluations],
            "phase_marks": self.phase_marks,
            "examples": [{"prompt": p, "base": b, "final": f}
                         for p, b, f in list(zip(self.plan.eval_prompts, base.replies, final.replies))[:6]],
        }
        return out


def replies_digest(replies: Sequence[str]) -> str:
    """The first 16 hex digits of the SHA-256 of the replies in order (each one's length first, so no
    two lists of replies share a digest by where one reply ends and the next begins)."""
    h = hashlib.sha256()
    for r in replies:
        data = r.encode()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def _spread(words: dict[str, float] | None) -> str:
    return f" (p10-p50-p90 {words['p10']:.0f}-{words['p50']:.0f}-{words['p90']:.0f})" if words else ""


def phase_criteria(criteria: Sequence[Criterion], *, together: bool, keep_earlier: bool) -> list[list[Criterion]]:
    """The criteria each phase's best-of-N is ranked by: all at once in one phase (``together``), or
    one phase per criterion, each also keeping the earlier ones (``keep_earlier``) or not."""
    if together:
        return [list(criteria)]
    return [list(criteria[: k + 1]) if keep_earlier else [c] for k, c in enumerate(criteria)]


def make_plan(cfg: LoopConfig, phases: int) -> PromptPlan:
    train = load_prompts(cfg.prompts or shared_data_dir() / TRAIN_FILE, field_name="prompts")
    held = load_prompts(cfg.eval_prompts or shared_data_dir() / TEST_FILE, field_name="eval_prompts")
    return plan_prompts(train, held, eval_count=cfg.eval_count, per_phase=cfg.train_prompts, phases=phases,
                        seed=cfg.seed, guard_count=cfg.guard_prompts if cfg.guard_set and cfg.gate_every else 0)


def run_criteria_loop(cfg: LoopConfig, *, write_html: bool = True) -> dict[str, Any]:
    """Run the loop once; returns the summary (also written, with the HTML report, to the report folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = make_plan(cfg, 1 if cfg.together else len(cfg.criteria))
    procs = LoopProcesses(cfg, plan.guard_prompts)
    started = time.time()
    try:
        procs.start()
        store = CriteriaStore(procs.redis)
        criteria = resolve_criteria(store, cfg.criteria, cfg.project)
        holder = f"loop-{os.getpid()}"
        for c in criteria:
            store.mark_in_use(c.project, c.name, holder)
        try:
            with FeedbackModes(store, criteria, cfg.dpo_loss, cfg.pairing) as modes:
                what = FEEDBACK_MODE_SUMMARIES[modes.mode]
                _out(f"criteria feedback per best-of-N: {what} (mode {modes.mode}, dpo_loss {cfg.dpo_loss})")
                loop = CriteriaLoop(cfg, procs, criteria, plan)
                loop.t0 = started
                summary = asyncio.run(loop.run())
        finally:
            for c in criteria:
                store.release(c.project, c.name, holder)
        procs.check()
    finally:
        procs.stop()
    summary["wall_s"] = round(time.time() - started, 1)
    if write_html:
        from loop.report import write_loop_report

        report_dir = Path(cfg.report_dir or Path("reports") / time.strftime("loop-%Y%m%d-%H%M%S")).resolve()
        summary["report"] = str(write_loop_report(report_dir, summary))
    return summary


def print_summary(s: dict[str, Any]) -> None:
    def f(x: Any, fmt: str = "{:.3f}") -> str:
        return "-" if x is None else fmt.format(x)

    _out("")
    _out(f"criteria loop: {', '.join(s['criteria'])}  ({s['wall_s']:.0f} s)")
    _out(f"  {s['criterion']} violation rate of the served policy: {f(s['violation_rate_base'])} -> "
         f"{f(s['violation_rate_final'])} (relative reduction {f(s['relative_reduction'])}) on "
         f"{s['eval_prompts']} held-out prompts")
    if s.get("first_criterion_retention") is not None:
        _out(f"  first criterion's gain kept after the later phases: {f(s['first_criterion_retention'])}")
    _out(f"  reward model prefers the final reply to the base reply on {f(s['quality_win_rate_vs_base'])} of prompts")
    _out(f"  words per reply {f(s['mean_words_base'], '{:.1f}')} -> {f(s['mean_words_final'], '{:.1f}')}"
         f"{_spread(s.get('words_spread_final'))}; "
         f"KL to reference {f(s['kl_to_ref'])}")
    _out(f"  policy versions: {s['versions_published']} published, {s['versions_rejected']} rejected; "
         f"best-of-N: {s['best_of_n_sent']} sent, {s['failed_requests']} failed")
    if s.get("report"):
        _out(f"  report: {s['report']}")


__all__ = ["CriteriaLoop", "Evaluation", "FeedbackModes", "LoopProcesses", "feedback_mode_for", "make_plan",
           "phase_criteria", "print_summary", "replies_digest", "resolve_criteria", "run_criteria_loop"]
