"""The scorer's chaos scenarios for ``prefstream bench chaos``: crashes and bad checkpoints under best-of-N load.

Why it exists: bench/chaos.py covers the ingest path and hot swaps under Score; what a caller of a
replicated scorer sees when a replica dies, and whether a bad checkpoint can ever reach an answer, need
a load of their own (BestOfN, the call a sampler makes) and a registry with bad versions in it.

The load (:class:`BestOfNLoad`): ``clients`` closed-loop threads, each at most one request per
``interval_s``, send ``ScorerService.BestOfN`` with 4 supplied candidates (two HH-RLHF test records'
chosen and rejected responses, no policy sampling), round-robin over the replica addresses.  They behave
as clients of a replicated service should: an UNAVAILABLE answer or a connection failure is retried
(the same request, short backoff, on the next replica) and counted in ``refused_while_down``; anything
else that is not OK is a failed request.  Every answer's (time, served reward version, replica) is kept.

Scenarios (each on its own throwaway Redis registry and checkpoint store under ``root``, the embedded
MiniLM reward model, ``max_length`` 128):

* ``scorer-kill``: two scorer replicas serve published ``v1``; ``kills`` times, one of them is killed
  with SIGKILL, left down ~2 s and restarted on the same port.  Keys: ``requests`` (answered OK),
  ``failed_requests`` (must be 0) and ``failures`` (the first 5, as text), ``retried`` (requests that
  needed at least one retry), ``refused_while_down`` (UNAVAILABLE or connection-failure attempts),
  ``unanswered_at_stop`` (requests still retrying when the load stopped), ``outage_s`` (kill -> restart,
  per kill), ``answers_during_outage`` (answered by the survivor while the other was down),
  ``recovery_s_each`` (restart -> the restarted replica answers a BestOfN OK, polled directly) and
  ``recovery_s`` (their max; None when one never came back), ``versions`` (answers per served version),
  and ``ok`` (no failed or unanswered request, every replica back).
* ``corrupt-checkpoint``: one scorer serves ``v1``; then ``v2`` (a checkpoint whose weights file has
  flipped bytes after its manifest was written), ``v3`` (manifest.json removed) and ``v4`` (a real
  checkpoint with a NaN head bias: it verifies, and only the warm-up can tell) are published one after
  another; each must be refused and recorded in the registry while every answer still comes from ``v1``.
  The scorer is then killed and restarted while ``v4`` is still the newest published version: it must
  come up on ``v1`` (the newest that passes verification and warm-up).  Finally a good ``v5`` is
  published and must be served.  Keys: the load's keys as above, ``refused`` ({version, reason} as the
  registry records them), ``refused_as_expected`` (each reason starts with the expected label:
  corrupt, corrupt, nonfinite), ``refused_after_s`` (publish -> refusal recorded, per bad version),
  ``served_during`` (versions answered from the first bad publish until ``v5`` was published: must be
  ``["v1"]``), ``restart_serving`` (the version of the restarted scorer's first OK answer, or why there was none),
  ``recovery_s`` (restart -> that answer), ``good_served_after_s`` (``v5`` published -> first answer
  from it), and ``ok``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

MODEL = "reward"
#: what a retrying client sleeps before its n-th retry: n x this, at most RETRY_BACKOFF_MAX_S
RETRY_BACKOFF_S = 0.05
RETRY_BACKOFF_MAX_S = 0.5
#: Reconnect quickly once a replica is back: gRPC's default backoff starts at 1 s and grows to 120 s,
#: which would measure the channel rather than the scorer.
_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500))


# ------------------------------------------------------------------------------------------------
# the load


def bestofn_requests(limit: int = 200) -> list[Any]:
    """BestOfN requests with 4 supplied candidates each: the chosen and rejected responses of two HH
    test records, under the first one's prompt."""
    from bench.scorer import load_inputs
    from scorer.domain import BestOfNQuery

    pairs = load_inputs(limit)  # (prompt, chosen), (prompt, rejected), ... per record
    return [BestOfNQuery(prompt=tuple(pairs[i][0]), candidates=tuple(r for _, r in pairs[i:i + 4])).to_proto()
            for i in range(0, len(pairs) - 3, 4)]


def _channel(address: str) -> Any:
    import grpc

    from services.grpc_server import DEFAULT_OPTIONS

    opts = [(k, v) for k, v in DEFAULT_OPTIONS if k.startswith("grpc.max_")] + list(_CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=opts)


@dataclass(frozen=True)
class Answer:
    """One OK BestOfN answer: when (monotonic), which reward version ranked it, which replica."""

    t: float
    version: str
    address: str


class BestOfNLoad:
    """Closed-loop BestOfN clients that retry UNAVAILABLE on the next replica (see the module docstring)."""

    def __init__(self, addresses: Sequence[str], requests: Sequence[Any], *, clients: int = 4,
                 interval_s: float = 0.1, timeout_s: float = 30.0, max_retry_s: float = 120.0) -> None:
        self.addresses = list(addresses)
        self.requests = list(requests)
        self.clients = clients
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_retry_s = max_retry_s
        self.answers: list[Answer] = []
        self.failed: list[str] = []
        self.retried = 0
        self.refused_while_down = 0
        self.unanswered_at_stop = 0
        self.unavailable_details: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # no new requests
        self._abort = threading.Event()  # give up the ones still retrying
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"bestofn-{i}", daemon=True)
                         for i in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop sending new requests; let those being retried finish for up to ``drain_s``."""
        self._stop.set()
        deadline = time.monotonic() + drain_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def _client(self, i: int) -> None:
        from prefstream.scorer.v1 import scorer_pb2_grpc

        channels = {a: _channel(a) for a in self.addresses}
        stubs = {a: scorer_pb2_grpc.ScorerServiceStub(ch) for a, ch in channels.items()}
        n = i
        try:
            while not self._stop.is_set():
                next_at = time.monotonic() + self.interval_s
                self._one(stubs, self.requests[n % len(self.requests)], first=n)
                n += self.clients
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            for ch in channels.values():
                ch.close()

    def _one(self, stubs: dict[str, Any], request: Any, first: int) -> None:
        import grpc

        started, attempt = time.monotonic(), 0
        while True:
            address = self.addresses[(first + attempt) % len(self.addresses)]
            try:
                resp = stubs[address].BestOfN(request, timeout=self.timeout_s)
            except grpc.RpcError as e:
                code, details = e.code(), (e.details() or "")
                if code != grpc.StatusCode.UNAVAILABLE:
                    with self._lock:
                        self.failed.append(f"{address} {code.name}: {details[:200]}")
                    return
                with self._lock:
                    self.refused_while_down += 1
                    self.retried += attempt == 0
                    self.unavailable_details[details[:80]] += 1
                attempt += 1
                if self._abort.is_set():
                    with self._lock:
                        self.unanswered_at_stop += 1
                    return
                if time.monotonic() - started > self.max_retry_s:
                    with self._lock:
                        self.failed.append(f"UNAVAILABLE for {self.max_retry_s:.0f}s on every replica: {details[:200]}")
                    return
                self._abort.wait(min(RETRY_BACKOFF_S * attempt, RETRY_BACKOFF_MAX_S))
                continue
            version = resp.reward_models[0].version if resp.reward_models else ""
            with self._lock:
                self.answers.append(Answer(time.monotonic(), version, address))
            return

    def versions(self, start: float = -math.inf, end: float = math.inf, address: str | None = None) -> Counter[str]:
        """Answers per served version between ``start`` and ``end`` (monotonic), optionally from one replica."""
        with self._lock:
            return Counter(a.version for a in self.answers
                           if start <= a.t < end and (address is None or a.address == address))

    def first_answer(self, version: str, after: float) -> float | None:
        """Monotonic time of the first answer from ``version`` at or after ``after``."""
        with self._lock:
            ts = [a.t for a in self.answers if a.t >= after and a.version == version]
        return min(ts) if ts else None

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": len(self.answers),
                "failed_requests": len(self.failed),
                "failures": self.failed[:5],
                "retried": self.retried,
                "refused_while_down": self.refused_while_down,
                "unanswered_at_stop": self.unanswered_at_stop,
                "unavailable_details": dict(self.unavailable_details.most_common(5)),
                "clients": self.clients,
            }


# ------------------------------------------------------------------------------------------------
# scorer processes


def scorer_env(redis_url: str, **extra: str) -> dict[str, str]:
    """A chaos scorer's environment: the registry at ``redis_url``, fast polling, no discovery; ``extra``
    overrides (``PREFSTREAM_SCORER_*`` names)."""
    return {"PREFSTREAM_SCORER_REDIS_URL": redis_url, "PREFSTREAM_SCORER_POLL_INTERVAL_S": "0.2",
            "PREFSTREAM_SCORER_DISCOVER_MODELS": "false", "PREFSTREAM_SCORER_MAX_LENGTH": "128", **extra}


def _start_scorers(root: Path, names: Sequence[str], env: dict[str, str], started: list[Any]) -> list[str]:
    """Start one scorer per name at once (each waits for its model); every one started is appended to
    ``started`` (so the caller stops it), even when another fails.  Returns their addresses."""
    from bench.scorer_process import start_scorer

    with ThreadPoolExecutor(len(names)) as ex:
        futures = [ex.submit(start_scorer, root, name, env) for name in names]
        addresses, error = [], None
        for f in futures:
            try:
                proc, address = f.result()
            except Exception as e:  # noqa: BLE001 - the others still have to be stopped
                error = error or e
                continue
            started.append(proc)
            addresses.append(address)
    if error is not None:
        raise error
    return addresses


def _restart(proc: Any) -> Any:
    """The same scorer again (same port, environment and log), not waiting for it."""
    from services.stack import ServiceProcess

    return ServiceProcess(proc.name, proc.module, dict(proc.env), proc.log_path).start()


def _await_ok(proc: Any, address: str, request: Any, since: float, timeout_s: float) -> tuple[float | None, str]:
    """Poll one replica with BestOfN (a fresh channel each time) until it answers OK: (seconds from
    ``since``, the version that answered), or (None, why) when it exited or ``timeout_s`` passed."""
    import grpc

    from prefstream.scorer.v1 import scorer_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive:
            return None, f"exited with code {proc.proc.returncode}; log {proc.log_path}"
        ch = _channel(address)
        try:
            resp = scorer_pb2_grpc.ScorerServiceStub(ch).BestOfN(request, timeout=10)
            return round(time.monotonic() - since, 2), resp.reward_models[0].version
        except grpc.RpcError:
            pass
        finally:
            ch.close()
        time.sleep(0.1)
    return None, f"no OK answer within {timeout_s:.0f}s"


def _stop_all(procs: Sequence[Any]) -> None:
    for p in procs:
        try:
            p.stop(timeout_s=10)
        except Exception as e:  # noqa: BLE001 - stop the others anyway
            log.warning("could not stop %s: %s", p.name, e)


def _flip_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file (after its manifest recorded the checksum)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(count)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def _write(store: Any, model: Any, tag: str, bias: float) -> Any:
    """A real checkpoint of ``model`` with the head bias set to ``bias`` (versions answer differently)."""
    import torch

    with torch.no_grad():
        model.hf_model.classifier.bias.fill_(bias)
    return store.write(MODEL, tag, lambda d: model.save(d), {"bench": "chaos-scorer", "head_bias": str(bias)})


# ------------------------------------------------------------------------------------------------
# scenarios


def scorer_kill(root: Path, kills: int, quick: bool) -> dict[str, Any]:
    """The ``scorer-kill`` scenario (see the module docstring)."""
    from bench.scorer_process import start_redis
    from services.checkpoints import CheckpointStore
    from services.kinds import ModelKind
    from services.registry import ModelRegistry, ModelVersion
    from services.reward_model import RewardModel

    steady_s = 3.0 if quick else 10.0
    redis_proc, client, url = start_redis()
    replicas: list[Any] = []
    load: BestOfNLoad | None = None
    try:
        store, registry = CheckpointStore(str(root / "scorer-kill-checkpoints")), ModelRegistry(client)
        ref = _write(store, RewardModel.from_pretrained(max_length=128), "c1", 0.0)
        registry.publish(ModelVersion(name=MODEL, version="v1", uri=ref.uri, kind=ModelKind.REWARD))
        threads = str(max(1, (os.cpu_count() or 2) // 2))  # two replicas share the cores
        env = scorer_env(url, PREFSTREAM_SCORER_TORCH_THREADS=threads, PREFSTREAM_SCORER_INFER_WORKERS="1")
        addresses = _start_scorers(root, ["scorer-kill-a", "scorer-kill-b"], env, replicas)
        requests = bestofn_requests()
        load = BestOfNLoad(addresses, requests)
        load.start()
        time.sleep(steady_s)
        outages, recoveries, during = [], [], []
        for k in range(kills):
            i = k % len(replicas)
            t_kill = time.monotonic()
            replicas[i].kill()
            time.sleep(2.0)
            replicas[i] = _restart(replicas[i])
            t_back = time.monotonic()
            recovered, why = _await_ok(replicas[i], addresses[i], requests[0], t_back, 180.0)
            outages.append(round(t_back - t_kill, 2))
            recoveries.append(recovered)
            during.append(sum(load.versions(t_kill, t_back, addresses[1 - i]).values()))
            log.info("scorer-kill #%d: down %.1fs, answering %s s after the restart (%s)", k + 1, t_back - t_kill,
                     recovered, why)
            if recovered is None:
                break
            time.sleep(steady_s)
        load.stop()
        summary = load.summary()
        recovery_s = max(recoveries) if recoveries and None not in recoveries else None
        return {
            "name": "scorer-kill",
            "kills": kills,
            **summary,
            "replicas": len(replicas),
            "outage_s": outages,
            "answers_during_outage": during,
            "recovery_s": recovery_s,
            "recovery_s_each": recoveries,
            "versions": dict(load.versions()),
            "ok": summary["failed_requests"] == 0 and summary["unanswered_at_stop"] == 0 and recovery_s is not None,
        }
    finally:
        if load is not None:
            load.stop(drain_s=0.0)
        _stop_all(replicas)
        redis_proc.terminate()
        redis_proc.wait(10)


def corrupt_checkpoint(root: Path, quick: bool) -> dict[str, Any]:
    """The ``corrupt-checkpoint`` scenario (see the module docstring)."""
    from bench.scorer_process import start_redis
    from services.checkpoints import MANIFEST, CheckpointStore
    from services.kinds import ModelKind
    from services.registry import ModelRegistry, ModelVersion
    from services.reward_model import RewardModel

    steady_s = 3.0 if quick else 10.0
    redis_proc, client, url = start_redis()
    scorers: list[Any] = []
    load: BestOfNLoad | None = None
    try:
        store, registry = CheckpointStore(str(root / "corrupt-checkpoint-checkpoints")), ModelRegistry(client)
        model = RewardModel.from_pretrained(max_length=128)
        good1 = _write(store, model, "c1", 0.0)
        flipped = _write(store, model, "c2", 0.5)
        weights = sorted(Path(flipped.path).glob("*.safetensors"))
        _flip_bytes(weights[0])
        unfinished = _write(store, model, "c3", 0.5)
        (Path(unfinished.path) / MANIFEST).unlink()
        nan = _write(store, model, "c4", float("nan"))
        good5 = _write(store, model, "c5", 1.0)
        del model

        def publish(version: str, uri: str) -> None:
            registry.publish(ModelVersion(name=MODEL, version=version, uri=uri, kind=ModelKind.REWARD))

        publish("v1", good1.uri)
        _start_scorers(root, ["scorer-corrupt"], scorer_env(url), scorers)
        address = f"127.0.0.1:{scorers[0].env['PREFSTREAM_SCORER_PORT']}"
        requests = bestofn_requests()
        load = BestOfNLoad([address], requests)
        load.start()
        time.sleep(steady_s)

        t_bad = time.monotonic()
        bad = [("v2", flipped.uri, "corrupt"), ("v3", unfinished.uri, "corrupt"), ("v4", nan.uri, "nonfinite")]
        refused_after: dict[str, float | None] = {}
        for version, uri, _ in bad:
            t0 = time.monotonic()
            publish(version, uri)
            refused_after[version] = None
            while time.monotonic() - t0 < 60 and scorers[0].alive:
                if version in registry.refused(MODEL):
                    refused_after[version] = round(time.monotonic() - t0, 2)
                    break
                time.sleep(0.1)
            time.sleep(1.0)  # answers after the refusal: still the good version
        recorded = registry.refused(MODEL)
        refused = [{"version": v, "reason": r} for v, r in sorted(recorded.items())]
        as_expected = all(recorded.get(v, "").startswith(label) for v, _, label in bad)

        # Restart while v4, which nobody can serve, is the newest published version.
        scorers[0].kill()
        scorers[0] = _restart(scorers[0])
        t_restart = time.monotonic()
        recovery_s, restart_serving = _await_ok(scorers[0], address, requests[0], t_restart, 180.0)
        if recovery_s is not None:
            time.sleep(steady_s)

        t_good = time.monotonic()
        publish("v5", good5.uri)
        good_at = None
        while time.monotonic() - t_good < 60 and good_at is None and recovery_s is not None:
            time.sleep(0.2)
            good_at = load.first_answer("v5", t_good)
        time.sleep(1.0)
        load.stop()
        served_during = sorted(load.versions(t_bad, t_good))
        summary = load.summary()
        good_served_after_s = round(good_at - t_good, 2) if good_at is not None else None
        ok = (summary["failed_requests"] == 0 and summary["unanswered_at_stop"] == 0
              and all(refused_after[v] is not None for v, _, _ in bad) and as_expected
              and served_during == ["v1"] and restart_serving == "v1" and recovery_s is not None
              and good_served_after_s is not None)
        return {
            "name": "corrupt-checkpoint",
            **summary,
            "refused": refused,
            "refused_as_expected": as_expected,
            "refused_after_s": refused_after,
            "served_during": served_during,
            "restart_serving": restart_serving,
            "recovery_s": recovery_s,
            "good_served_after_s": good_served_after_s,
            "versions": dict(load.versions()),
            "ok": ok,
        }
    finally:
        if load is not None:
            load.stop(drain_s=0.0)
        _stop_all(scorers)
        redis_proc.terminate()
        redis_proc.wait(10)


__all__ = ["Answer", "BestOfNLoad", "bestofn_requests", "corrupt_checkpoint", "scorer_kill"]
