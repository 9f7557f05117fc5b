"""Named criteria through the scorer's admin RPCs and BestOfN, against real Redis: a rule criterion
created over gRPC ranks given candidates and explains each verdict; ties go to the reward model; an
unknown name is NOT_FOUND naming the entry; the criterion is in use while served, so a plain delete is
refused; the feedback switch round-trips."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.errors import FailedPrecondition, NotFound
from tests.integration.test_scorer import base_model, env, scorer_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def test_best_of_n_by_a_criterion_created_over_the_admin_api(env, redis_url: str) -> None:  # noqa: F811
    from scorer.client import ScorerClient

    env.publish("v1", 0.0)
    project = f"p{uuid.uuid4().hex[:6]}"
    name = f"brief{uuid.uuid4().hex[:4]}"

    async def main() -> dict[str, Any]:
        scorer = scorer_for(env, redis_url)
        await scorer.start()
        try:
            client = ScorerClient(f"127.0.0.1:{scorer.handle.port}")
            created = await client.create_criterion(
                {"name": name, "rules": [{"max_words": 3}], "tie_breaker": {"reward_model": env.name}}, project=project)
            again = await client.create_criterion(
                {"name": name, "rules": [{"max_words": 3}], "tie_breaker": {"reward_model": env.name}}, project=project)
            listed = await client.list_criteria(project)
            candidates = ["far too many words in this reply", "short one", "also short", "way too long a reply here"]
            res = await client.best_of_n([{"role": "user", "content": "Say hi."}], candidates=candidates,
                                         criteria_refs=[name], project=project)
            pinned = await client.best_of_n([{"role": "user", "content": "Say hi."}], candidates=candidates,
                                            criteria_refs=[f"{name}@v1"], project=project)
            old_style = await client.best_of_n([{"role": "user", "content": "Say hi."}], candidates=candidates,
                                               criteria_refs=[env.name], project=project)
            missing = None
            try:
                await client.best_of_n([{"role": "user", "content": "x"}], candidates=["a", "b"],
                                       criteria_refs=[name, "nope"], project=project)
            except NotFound as e:
                missing = e
            refused = None
            try:
                await client.delete_criterion(name, project=project)
            except FailedPrecondition as e:
                refused = e
            switch = await client.set_criteria_feedback(False, name=name, project=project, mode="ranking")
            deleted = await client.delete_criterion(name, project=project, force=True, reason="test done")
            await client.close()
            return dict(created=created, again=again, listed=listed, res=res, pinned=pinned, old=old_style,
                        missing=missing, refused=refused, switch=switch, deleted=deleted)
        finally:
            await scorer.stop(grace_s=1)

    out = asyncio.run(main())
    assert out["created"]["version"] == "v1" and out["created"]["created"] and not out["again"]["created"]
    assert [c["name"] for c in out["listed"]] == [name]
    res = out["res"]
    assert res.criteria == (f"{name}@v1",) and out["pinned"].criteria == (f"{name}@v1",)
    assert {c.index for c in res.ranked[:2]} == {1, 2}  # the two short replies pass, the long ones fail
    best = res.ranked[0]
    assert best.criteria_results[name].passed is True and best.criteria_results[name].version == "v1"
    assert res.ranked[-1].criteria_results[name].passed is False
    assert "max_words" in res.ranked[-1].criteria_results[name].explanation
    # equal scores are ordered by the reward model, the tie breaker
    assert res.ranked[0].tie_break >= res.ranked[1].tie_break and res.ranked[2].tie_break >= res.ranked[3].tie_break
    assert {m.name for m in res.reward_models} == {env.name}
    assert out["old"].criteria == () and len(out["old"].ranked) == 4  # a reward model name: the old weighting
    assert out["missing"] is not None and "criteria_refs[1]" in str(out["missing"])
    assert out["refused"] is not None and "in use" in str(out["refused"])
    assert out["switch"][name] == {"enabled": False, "mode": "ranking"}
    assert out["deleted"] == ["v1"]
