"""Best-of-N by named criteria and the criteria feedback it turns into: the pure parts, with fakes."""

from __future__ import annotations

import asyncio

import pytest

from gateway.derive import derive_criteria
from gateway.events import Completion, CriteriaScores
from prefstream.events.v1 import events_pb2
from scorer.bestofn import Criterion as RewardWeight
from scorer.bestofn import parse_criteria_header
from scorer.criteria import NamedCriteria
from services.criteria import parse_criterion
from services.criteria_eval import judge_messages
from services.criteria_store import resolve_feedback
from services.errors import InvalidArgument, NotFound
from services.kinds import FeedbackKind
from services.schemas import ChatMessage

PROMPT = (ChatMessage("user", "Say something."),)


def test_the_header_tells_named_criteria_from_weighted_reward_models() -> None:
    assert parse_criteria_header('["concise", "helpful@v2"]') == ([], ["concise", "helpful@v2"])
    assert parse_criteria_header("concise, helpful") == ([], ["concise", "helpful"])
    assert parse_criteria_header("reward:2,safety") == ([RewardWeight("reward", 2.0), RewardWeight("safety", 1.0)], [])
    assert parse_criteria_header('{"reward": 1}') == ([RewardWeight("reward", 1.0)], [])
    assert parse_criteria_header('[{"model": "reward", "weight": 3}]') == ([RewardWeight("reward", 3.0)], [])
    with pytest.raises(InvalidArgument) as e:
        parse_criteria_header('["concise", "bad name!"]')
    assert e.value.field == "op-criteria[1]"
    with pytest.raises(InvalidArgument, match="twice"):
        parse_criteria_header("a, a")


class FakeDefinitions:
    def __init__(self, *criteria) -> None:
        self.by_ref = {}
        for c in criteria:
            self.by_ref[(c.project, c.name)] = c
            self.by_ref[(c.project, c.ref)] = c
        self.marked: list[tuple[str, str, str]] = []

    def get(self, project: str, ref: str):
        try:
            return self.by_ref[(project, ref)]
        except KeyError:
            raise NotFound(f"no criterion {ref}", field="criterion") from None

    def mark_in_use(self, project: str, name: str, holder: str, *, ttl_s=None) -> None:
        self.marked.append((project, name, holder))


def stored(data: dict, version: str = "v1"):
    import dataclasses

    return dataclasses.replace(parse_criterion(data, project="default"), version=version)


CONCISE = stored({"name": "concise", "rules": [{"max_words": 3}], "tie_breaker": {"reward_model": "reward"}})
POLITE = stored({"name": "polite", "rules": [{"contains_any": ["please"], "flags": "i"}], "weight": 3.0})


def test_resolve_finds_stored_criteria_falls_back_to_served_reward_models_and_names_what_is_missing() -> None:
    defs = FakeDefinitions(CONCISE, POLITE)
    named = NamedCriteria(defs, holder="scorer-1")
    served = {"reward"}.__contains__
    got = named.resolve("default", ["concise@v1", "reward"], served)
    assert [c.ref for c in got] == ["concise@v1", "reward"] and got[1].reward.model == "reward"
    assert defs.marked == [("default", "concise", "scorer-1")]  # implicit reward criteria are not stored
    named.resolve("default", ["concise"], served)
    assert len(defs.marked) == 1  # renewed at most every ttl / 3
    assert named.resolve("default", ["reward"], served) is None  # reward models only: the old weighting
    with pytest.raises(NotFound) as e:
        named.resolve("default", ["concise", "nope"], served)
    assert e.value.field == "criteria_refs[1]"
    assert NamedCriteria(None, holder="x").resolve("default", ["reward"], served) is None


def test_rank_combines_weighted_criteria_and_breaks_ties_with_the_reward_model() -> None:
    named = NamedCriteria(FakeDefinitions(CONCISE, POLITE), holder="s")
    replies = ["one two three four", "please be brief", "short reply", "please, this is far too long"]
    rewards = {"reward": [(0.1, {}), (0.2, {}), (0.9, {}), (0.5, {})]}

    async def score(model, prompt, texts):
        assert list(texts) == replies
        return rewards[model]

    async def judge(spec, prompt, texts):
        raise AssertionError("no judge criterion here")

    out = asyncio.run(named.rank([CONCISE, POLITE], PROMPT, replies, score, judge))
    # concise (w 1): [0, 1, 1, 0]; polite (w 3): [0, 1, 0, 1] -> combined [0, 1, .25, .75]
    assert out.combined == pytest.approx([0.0, 1.0, 0.25, 0.75])
    assert out.order == [1, 3, 2, 0] and out.refs == ("concise@v1", "polite@v1")
    assert out.tie_break == [0.1, 0.2, 0.9, 0.5]
    assert out.results["concise"][0].passed is False and out.results["polite"][1].passed is True
    # equal combined scores are ordered by the tie breaker
    tie = asyncio.run(named.rank([CONCISE], PROMPT, ["a b", "c d", "e f g h i"], score=lambda m, p, t: _const(
        [(0.3, {}), (0.8, {}), (0.0, {})]), judge=judge))
    assert tie.order == [1, 0, 2]


async def _const(value):
    return value


def test_judge_criteria_read_the_judges_probability_and_the_prompt_names_the_question() -> None:
    judge_c = stored({"name": "on-topic", "judge": {"model": "policy", "question": "Does the reply answer it?"}})
    named = NamedCriteria(FakeDefinitions(judge_c), holder="s")

    async def judge(spec, prompt, texts):
        return [0.9, 0.2]

    out = asyncio.run(named.rank([judge_c], PROMPT, ["yes it does", "no"], score=None, judge=judge))
    assert out.order == [0, 1] and out.results["on-topic"][0].score == pytest.approx(0.9)
    msgs = judge_messages(judge_c.judge, PROMPT, "the reply")
    assert msgs[0].role == "system" and "Does the reply answer it?" in msgs[1].content and "the reply" in msgs[1].content


def test_the_feedback_switch_per_project_and_per_criterion() -> None:
    assert resolve_feedback({}, ["a"]) == "pair"
    assert resolve_feedback({"*": {"enabled": False, "mode": "pair"}}, ["a"]) is None
    assert resolve_feedback({"*": {"enabled": False}, "a": {"enabled": True, "mode": "ranking"}}, ["a"]) == "ranking"
    assert resolve_feedback({"b": {"enabled": False}}, ["a", "b"]) is None
    assert resolve_feedback({"*": {"enabled": True, "mode": "ranking"}}, ["a"]) == "ranking"


def completion(scores, tie_break=(), mode="pair", split="train") -> Completion:
    return Completion(event_id="e1", project="default", prompt=PROMPT, candidates=("A", "B", "C"), completion_id="cmp_1",
                      split=split, acked_at=5.0,
                      criteria=CriteriaScores(refs=("concise@v2",), scores=tuple(scores), tie_break=tuple(tie_break),
                                              per_criterion=tuple({"concise": s} for s in scores), mode=mode))


def test_a_completion_ranked_by_criteria_becomes_a_record_tagged_with_the_criterion_version() -> None:
    [r] = derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.2, 0.1, 0.7]), "pair", now=10.0)
    assert r.ranked_responses == ("C", "B") and r.source_kind == FeedbackKind.CRITERIA
    assert r.source_event_ids == ("e1", "criterion:concise@v2") and r.completion_id == "cmp_1"
    assert r.source_acked_at == 5.0 and r.margin == pytest.approx(1.0)
    assert derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.2, 0.1, 0.7]), "pair", now=99.0)[0].record_id == r.record_id
    [ranking] = derive_criteria(completion([1.0, 0.0, 0.5]), "ranking", now=10.0)
    assert ranking.ranked_responses == ("A", "C", "B")
    assert derive_criteria(completion([1.0, 1.0, 1.0]), "pair", now=10.0) == []  # all tie: no preference
    assert derive_criteria(completion([1.0, 0.0, 0.0], split="test"), "pair", now=1.0)[0].split == "test"


def test_pairs_also_pair_the_best_with_the_worst_of_its_own_criteria_class() -> None:
    # A and C pass (1.0), B fails: best C (tie break 0.7) over B, and C over A, the weaker passing reply.
    rule, within = derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.2, 0.1, 0.7]), "pairs", now=10.0)
    assert rule.ranked_responses == ("C", "B") and rule.margin == pytest.approx(1.0)
    assert within.ranked_responses == ("C", "A") and within.margin == pytest.approx(0.0)
    assert rule.record_id != within.record_id and within.source_event_ids == rule.source_event_ids
    assert within.response_attributes == ({"concise": 1.0}, {"concise": 1.0})
    again = derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.2, 0.1, 0.7]), "pairs", now=99.0)
    assert [r.record_id for r in again] == [rule.record_id, within.record_id]  # deterministic
    # Only the best passes: nothing to pair inside its class.
    assert [r.ranked_responses for r in derive_criteria(completion([1.0, 0.0, 0.0], tie_break=[0.5, 0.9, 0.1]),
                                                         "pairs", now=1.0)] == [("A", "C")]
    # Every reply in one class: the class pair would repeat the first.
    assert [r.ranked_responses for r in derive_criteria(completion([1.0, 1.0, 1.0], tie_break=[0.5, 0.9, 0.1]),
                                                         "pairs", now=1.0)] == [("B", "C")]
    # The best's class mate ties it on the tie breaker too: never a pair.
    assert [r.ranked_responses for r in derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.7, 0.1, 0.7]),
                                                         "pairs", now=1.0)] == [("A", "B")]


def _words(n: int, tag: str) -> str:
    return " ".join([tag] * n)


def _pairs(replies: list[str], scores: list[float], tb: list[float], mode: str) -> list[tuple[str, ...]]:
    from services.criteria_eval import preferences_from_scores

    return [r.ranked_responses for r in preferences_from_scores(PROMPT, replies, scores, tb, mode=mode)]


def test_matched_pairs_a_rule_across_classes_with_the_closest_lengths() -> None:
    from services.criteria_eval import preferences_from_scores

    # A word limit of 50: passing 10 and 48 words, failing 53 and 120. Best-vs-worst would be 48 over
    # 120 (or, by the tie breaker, 10 over 120): matched pairs the two nearest the limit, 48 over 53.
    replies = [_words(10, "a"), _words(48, "b"), _words(53, "c"), _words(120, "d")]
    [r] = preferences_from_scores(PROMPT, replies, [1.0, 1.0, 0.0, 0.0], [0.9, 0.1, 0.5, 0.8], mode="matched")
    assert r.ranked_responses == (replies[1], replies[2]) and r.margin == pytest.approx(1.0)
    [plain] = preferences_from_scores(PROMPT, replies, [1.0, 1.0, 0.0, 0.0], [0.9, 0.1, 0.5, 0.8], mode="pair")
    assert plain.ranked_responses == (replies[0], replies[2])  # best by tie breaker over worst: 10 vs 53 words
    # Equal length gaps: the wider tie-break gap decides (chosen high, rejected low).
    replies = [_words(40, "a"), _words(40, "b"), _words(60, "c"), _words(60, "d")]
    [r] = preferences_from_scores(PROMPT, replies, [1.0, 1.0, 0.0, 0.0], [0.2, 0.9, 0.7, 0.1], mode="matched")
    assert r.ranked_responses == (replies[1], replies[3])
    # More than two classes: only the best and the worst class pair, never the middle one.
    replies = [_words(30, "a"), _words(31, "b"), _words(60, "c")]
    [r] = preferences_from_scores(PROMPT, replies, [1.0, 0.5, 0.0], mode="matched")
    assert r.ranked_responses == (replies[0], replies[2])


def test_matched_ties_pair_only_replies_of_similar_length_by_the_tie_breaker() -> None:
    from services.criteria_eval import matched_pair, preferences_from_scores

    # Every reply passes. The tie breaker likes the long one best; matched pairs within 20% of each
    # other in words: 30 and 33 (gap 0.2 - 0.6), not 80 over 30 (a gap that would teach "longer").
    replies = [_words(80, "a"), _words(30, "b"), _words(33, "c")]
    [r] = preferences_from_scores(PROMPT, replies, [1.0, 1.0, 1.0], [0.9, 0.2, 0.6], mode="matched")
    assert r.ranked_responses == (replies[2], replies[1]) and r.margin == pytest.approx(0.0)
    # No two replies of similar length, or they tie on the tie breaker: no pair at all.
    assert preferences_from_scores(PROMPT, [_words(10, "a"), _words(50, "b")], [1.0, 1.0], [0.9, 0.1],
                                   mode="matched") == []
    assert preferences_from_scores(PROMPT, [_words(40, "a"), _words(41, "b")], [0.0, 0.0], [0.5, 0.5],
                                   mode="matched") == []
    assert preferences_from_scores(PROMPT, [_words(40, "a"), _words(41, "b")], [0.0, 0.0], mode="matched") == []
    # The tolerance bound is inclusive: 40 vs 50 words differ by exactly 20% of the longer.
    assert matched_pair([0, 1], [(1.0, 0.9), (1.0, 0.1)], [40, 50]) == (0, 1)
    assert matched_pair([0, 1], [(1.0, 0.9), (1.0, 0.1)], [40, 51]) is None
    assert matched_pair([0], [(1.0, 0.0)], [10]) is None
    # Deterministic, through the processor's path too: the same completion gives the same record.
    a = derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.2, 0.1, 0.7]), "matched", now=1.0)
    b = derive_criteria(completion([1.0, 0.0, 1.0], tie_break=[0.2, 0.1, 0.7]), "matched", now=9.0)
    assert len(a) == 1 and [r.record_id for r in a] == [r.record_id for r in b]


def test_matched_pairs_add_the_best_class_own_length_matched_pair() -> None:
    from services.criteria_eval import preferences_from_scores

    # A word limit of 50: passing 30, 33 and 48 words, failing 53. The rule's pair is 48 over 53; the
    # second is the tie breaker's widest gap among passing replies of similar length: 33 over 30
    # (48 is more than 20% longer than both, so it pairs with neither).
    replies = [_words(30, "a"), _words(33, "b"), _words(48, "c"), _words(53, "d")]
    scores, tb = [1.0, 1.0, 1.0, 0.0], [0.2, 0.6, 0.9, 0.5]
    rule, within = preferences_from_scores(PROMPT, replies, scores, tb, mode="matched_pairs")
    assert rule.ranked_responses == (replies[2], replies[3]) and rule.margin == pytest.approx(1.0)
    assert within.ranked_responses == (replies[1], replies[0]) and within.margin == pytest.approx(0.0)
    assert rule.record_id != within.record_id
    # matched gives the first alone; with every reply in one class both modes give the same one pair.
    assert _pairs(replies, scores, tb, "matched") == [rule.ranked_responses]
    same = [1.0] * 4
    assert _pairs(replies, same, tb, "matched_pairs") == _pairs(replies, same, tb, "matched")
    # A best class of one reply, or of replies too far apart in words, adds nothing.
    assert len(preferences_from_scores(PROMPT, replies, [1.0, 0.0, 0.0, 0.0], tb, mode="matched_pairs")) == 1
    assert len(preferences_from_scores(PROMPT, [_words(10, "a"), _words(40, "b"), _words(60, "c")],
                                       [1.0, 1.0, 0.0], [0.9, 0.1, 0.5], mode="matched_pairs")) == 1


def test_bracket_adds_the_matched_chosen_reply_over_its_class_weakest() -> None:
    from services.criteria_eval import preferences_from_scores

    # A word limit of 50: passing 12, 30 and 48 words, failing 53 and 90. The rule's matched pair is
    # 48 over 53; the tie breaker ranks the 12-word reply lowest among passing ones and below the
    # 48-word one, so the second pair is 48 over 12: the same chosen reply, pulled from both sides.
    replies = [_words(12, "a"), _words(30, "b"), _words(48, "c"), _words(53, "d"), _words(90, "e")]
    scores, tb = [1.0, 1.0, 1.0, 0.0, 0.0], [0.1, 0.6, 0.7, 0.5, 0.9]
    rule, up = preferences_from_scores(PROMPT, replies, scores, tb, mode="bracket")
    assert rule.ranked_responses == (replies[2], replies[3]) and rule.margin == pytest.approx(1.0)
    assert up.ranked_responses == (replies[2], replies[0]) and up.margin == pytest.approx(0.0)
    assert rule.record_id != up.record_id
    assert _pairs(replies, scores, tb, "matched") == [rule.ranked_responses]
    # The matched chosen reply is its class's weakest by the tie breaker: no second pair (the tie
    # breaker would not prefer it), and a best class of one reply has nobody to pull up.
    assert len(preferences_from_scores(PROMPT, replies, scores, [0.8, 0.6, 0.1, 0.5, 0.9], mode="bracket")) == 1
    assert len(preferences_from_scores(PROMPT, replies, [0.0, 0.0, 1.0, 0.0, 0.0], tb, mode="bracket")) == 1
    # Passing replies that tie on the tie breaker state no preference either.
    assert len(preferences_from_scores(PROMPT, replies, scores, [0.7, 0.7, 0.7, 0.5, 0.9], mode="bracket")) == 1
    # All in one class: the plain matched pair, as in matched.
    same = [1.0] * 5
    assert _pairs(replies, same, tb, "bracket") == _pairs(replies, same, tb, "matched")


def test_sentence_prefixes_stop_only_where_a_sentence_or_a_line_ends() -> None:
    from services.criteria_eval import passing_prefixes, sentence_prefixes

    text = "Sure! Here are tips:\n1. Use a pan. It heats fast.\n2. Salt it (a lot).\n- Stir often\nDone"
    assert sentence_prefixes(text) == [
        "Sure!",
        "Sure! Here are tips:\n1. Use a pan.",  # not after "tips:" (it opens a list) nor after "1."
        "Sure! Here are tips:\n1. Use a pan. It heats fast.",
        "Sure! Here are tips:\n1. Use a pan. It heats fast.\n2. Salt it (a lot).",
        "Sure! Here are tips:\n1. Use a pan. It heats fast.\n2. Salt it (a lot).\n- Stir often",  # a line end
    ]
    # Closing quotes stay with their sentence; an initial is no sentence end; the whole text is no prefix.
    assert sentence_prefixes('He said "go." Then J. Smith left. ') == ['He said "go."']
    assert sentence_prefixes("One sentence only.") == [] and sentence_prefixes("") == []
    assert sentence_prefixes("no end in sight and no\n\n") == []
    assert passing_prefixes("Aa bb. Cc dd ee. Ff gg hh ii.", lambda t: len(t.split()) <= 5) == [
        "Aa bb.", "Aa bb. Cc dd ee."]
    assert passing_prefixes("Aa bb cc dd ee ff. Gg.", lambda t: len(t.split()) <= 5) == []


def test_a_trimmer_cuts_only_replies_that_break_nothing_but_a_length_limit_and_refuses_model_backed_ones() -> None:
    from services.criteria_eval import prefix_trimmer

    concise = parse_criterion({"name": "concise", "rules": [{"max_words": 6}]})
    impersonal = parse_criterion({"name": "impersonal", "rules": [{"regex_must_not_match": r"\byou\b", "flags": "i"}]})
    trim = prefix_trimmer([concise, impersonal])
    assert trim is not None
    assert trim("Tea is hot. Cats purr. Dogs bark loudly.") == ["Tea is hot.", "Tea is hot. Cats purr."]  # the limit
    # A reply that breaks a content rule is not cut, however long: its repair is rewording, not stopping.
    assert trim("Tea is hot. You should try it. Now.") == []
    assert trim("Tea is hot. Cats purr and purr and purr. You know.") == []
    wordy = parse_criterion({"name": "wordy", "rules": [{"max_chars": 20}, {"min_words": 2}], "mode": "mean"})
    assert prefix_trimmer([wordy])("Tea is hot. Cats purr.") == ["Tea is hot."]  # max_chars is a length limit
    assert prefix_trimmer([concise, parse_criterion({"name": "helpful", "reward": {"model": "reward"}})]) is None
    assert prefix_trimmer([]) is None


def test_trim_pairs_a_failing_reply_with_its_own_passing_prefixes_else_the_matched_pair() -> None:
    from services.criteria_eval import prefix_trimmer, preferences_from_scores

    trim = prefix_trimmer([parse_criterion({"name": "concise", "rules": [{"max_words": 12}]})])
    runaway = "Boil water first. Then add the pasta and salt. Stir it now and then. Drain it after ten minutes."
    replies = ["Boil it.", "Boil water, add pasta, wait ten minutes and drain it well please now.", runaway,
               "Cook the pasta in a big pot of salted boiling water for ten minutes or so."]
    scores, tb = [1.0, 1.0, 0.0, 0.0], [0.1, 0.3, 0.9, 0.5]
    attrs = [{"concise": s} for s in scores]
    r, early = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim", trim=trim, attributes=attrs)
    # The best-ranked failing reply (tie breaker 0.9): its longest sentence prefix under 12 words over
    # the reply (stop here, not later) and over its shortest passing prefix (not sooner).
    longest = "Boil water first. Then add the pasta and salt."
    assert r.ranked_responses == (longest, runaway) and early.ranked_responses == (longest, "Boil water first.")
    assert runaway.startswith(longest) and r.margin == pytest.approx(1.0) and early.margin == pytest.approx(0.0)
    assert r.response_attributes == ({"concise": 1.0}, {"concise": 0.0})
    assert early.response_attributes == ({"concise": 1.0}, {"concise": 1.0})
    again = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim", trim=trim, attributes=attrs)
    assert [x.record_id for x in again] == [r.record_id, early.record_id]  # deterministic
    # The best failing reply has no passing prefix: the next one's is used; one passing prefix, one pair.
    one_sentence = "Cook the pasta in a big pot of salted boiling water for ten minutes or so"
    short_run = "Boil water first. Then add the pasta, salt it and stir it now and then."
    [r] = preferences_from_scores(PROMPT, [replies[0], one_sentence, short_run], [1.0, 0.0, 0.0], [0.1, 0.9, 0.2],
                                  mode="trim", trim=trim)
    assert r.ranked_responses == ("Boil water first.", short_run)
    # No failing reply trims, or no trimmer (a reward or judge criterion): the matched pair.
    no_cut = [replies[0], replies[1], replies[3]]
    assert _trim_or_matched(no_cut, [1.0, 1.0, 0.0], [0.1, 0.3, 0.5], trim) == _pairs(
        no_cut, [1.0, 1.0, 0.0], [0.1, 0.3, 0.5], "matched")
    assert _trim_or_matched(replies, scores, tb, None) == _pairs(replies, scores, tb, "matched")
    # Every reply passes: nothing to trim, the matched ties rule.
    assert _trim_or_matched(replies[:2], [1.0, 1.0], [0.1, 0.3], trim) == _pairs(replies[:2], [1.0, 1.0], [0.1, 0.3], "matched")
    # Through the processor's path.
    c = Completion(event_id="e1", project="default", prompt=PROMPT, candidates=tuple(replies), completion_id="cmp_1",
                   criteria=CriteriaScores(refs=("concise@v1",), scores=tuple(scores), tie_break=tuple(tb)))
    r, _ = derive_criteria(c, "trim", now=1.0, trim=trim)
    assert r.ranked_responses[1] == runaway and r.source_event_ids == ("e1", "criterion:concise@v1")
    assert derive_criteria(c, "trim", now=1.0)[0].ranked_responses == _pairs(replies, scores, tb, "matched")[0]


def test_trim_next_rejects_the_same_reply_cut_one_sentence_later_so_both_ends_stop() -> None:
    from services.criteria_eval import prefix_trimmer, preferences_from_scores

    trim = prefix_trimmer([parse_criterion({"name": "concise", "rules": [{"max_words": 12}]})])
    runaway = "Boil water first. Then add the pasta and salt. Stir it now and then. Drain it after ten minutes."
    replies, scores, tb = ["Boil it.", runaway], [1.0, 0.0], [0.1, 0.9]
    attrs = [{"concise": s} for s in scores]
    later, early = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_next", trim=trim, attributes=attrs)
    longest = "Boil water first. Then add the pasta and salt."
    # The reply's shortest sentence prefix past the limit, not the reply: both replies of a pair end the turn.
    assert later.ranked_responses == (longest, longest + " Stir it now and then.")
    assert early.ranked_responses == (longest, "Boil water first.")  # as trim's second pair
    assert later.margin == pytest.approx(1.0) and later.response_attributes == ({"concise": 1.0}, {})  # not scored
    assert later.record_id != preferences_from_scores(PROMPT, replies, scores, tb, mode="trim", trim=trim)[0].record_id
    # The sentence that crosses the limit is the reply's last (or unfinished): the reply itself is the later end.
    crossing = "Boil water first. Then add the pasta, salt it and stir it now and then"
    [r] = preferences_from_scores(PROMPT, [replies[0], crossing], scores, tb, mode="trim_next", trim=trim)
    assert r.ranked_responses == ("Boil water first.", crossing)
    # Nothing to trim: the matched pair, as trim.
    assert [x.ranked_responses for x in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_next")] == \
        _pairs(replies, scores, tb, "matched")


def test_trim_open_rejects_the_reply_going_on_past_the_chosen_end_not_ending_a_sentence_later() -> None:
    from services.criteria_eval import prefix_trimmer, preferences_from_scores

    trim = prefix_trimmer([parse_criterion({"name": "concise", "rules": [{"max_words": 12}]})])
    runaway = "Boil water first. Then add the pasta and salt. Stir it now and then. Drain it after ten minutes."
    replies, scores, tb = ["Boil it.", runaway], [1.0, 0.0], [0.1, 0.9]
    go_on, early = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_open", trim=trim)
    nxt = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_next", trim=trim)
    longest = "Boil water first. Then add the pasta and salt."
    # trim_next's texts; its first pair's rejected reply goes on (does not end the turn), the second pair ends both
    assert [r.ranked_responses for r in (go_on, early)] == [r.ranked_responses for r in nxt]
    assert go_on.unfinished == (1,) and go_on.ends == (True, False) and early.unfinished == ()
    assert go_on.record_id != nxt[0].record_id and early.record_id == nxt[1].record_id
    # the sentence that crosses the limit is the reply's last: the whole reply, going on as well
    crossing = "Boil water first. Then add the pasta, salt it and stir it now and then"
    [r] = preferences_from_scores(PROMPT, [replies[0], crossing], scores, tb, mode="trim_open", trim=trim)
    assert r.ranked_responses == ("Boil water first.", crossing) and r.unfinished == (1,)
    # nothing to trim: the matched pair, every reply ending its turn
    plain = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_open")
    assert [x.ranked_responses for x in plain] == _pairs(replies, scores, tb, "matched") and plain[0].unfinished == ()
    # trim_word: the prefix going on by the reply's next word, alone
    [word] = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_word", trim=trim)
    assert word.ranked_responses == (longest, longest + " Stir") and word.unfinished == (1,) and word.margin == 1.0
    listed = "Boil water first. Then add the pasta and salt.\n\n- Stir it now and then.\n- Drain it after ten minutes."
    [word] = preferences_from_scores(PROMPT, [replies[0], listed], scores, tb, mode="trim_word", trim=trim)
    assert word.ranked_responses == (longest, longest + "\n\n-")
    # trim_stop: the first pair alone
    [alone] = preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_stop", trim=trim)
    assert (alone.record_id, alone.ranked_responses, alone.unfinished) == (go_on.record_id, go_on.ranked_responses, (1,))
    assert [x.ranked_responses for x in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_stop")] == \
        _pairs(replies, scores, tb, "matched")


def test_trim_bracket_adds_the_tie_breaker_s_best_passing_reply_over_its_worst() -> None:
    from services.criteria_eval import prefix_trimmer, preferences_from_scores

    trim = prefix_trimmer([parse_criterion({"name": "concise", "rules": [{"max_words": 12}]})])
    runaway = "Boil water first. Then add the pasta and salt. Stir it now and then. Drain it after ten minutes."
    full = "Boil salted water, add the pasta, and drain it after ten minutes."
    replies, scores, tb = ["Boil it.", runaway, full], [1.0, 0.0, 1.0], [0.1, 0.9, 0.6]
    out = [r.ranked_responses for r in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_bracket", trim=trim)]
    longest = "Boil water first. Then add the pasta and salt."
    # trim_next's two pairs, then the passing replies: the tie breaker's best (0.6) over its worst (0.1)
    assert out == [(longest, longest + " Stir it now and then."), (longest, "Boil water first."), (full, "Boil it.")]
    # one passing reply, or passing replies the tie breaker cannot tell apart: trim_next's pairs alone
    assert len(preferences_from_scores(PROMPT, replies[:2], scores[:2], tb[:2], mode="trim_bracket", trim=trim)) == 2
    assert len(preferences_from_scores(PROMPT, replies, scores, [0.1, 0.9, 0.1], mode="trim_bracket", trim=trim)) == 2
    # every reply passes: the matched fallback, and the bracket pair unless it is the same pair
    allpass = ["Boil it.", full, "Boil the pasta for ten minutes in salted water."]
    got = [r.ranked_responses for r in preferences_from_scores(PROMPT, allpass, [1.0] * 3, [0.1, 0.6, 0.5],
                                                                mode="trim_bracket", trim=trim)]
    assert got == [*_pairs(allpass, [1.0] * 3, [0.1, 0.6, 0.5], "matched"), (full, "Boil it.")]
    two = [r.ranked_responses for r in preferences_from_scores(PROMPT, allpass[:2], [1.0] * 2, [0.1, 0.6],
                                                                mode="trim_bracket", trim=trim)]
    assert two == [(full, "Boil it.")]  # the matched pair needs similar lengths; the bracket pair does not


def test_trim_step_refuses_the_end_a_sentence_too_soon_as_trim_next_refuses_one_too_late() -> None:
    from services.criteria_eval import prefix_trimmer, preferences_from_scores

    trim = prefix_trimmer([parse_criterion({"name": "concise", "rules": [{"max_words": 12}]})])
    runaway = "Boil water. Add pasta. Salt it well. Stir it now and then. Drain it after ten minutes."
    replies, scores, tb = ["Boil it.", runaway], [1.0, 0.0], [0.1, 0.9]
    out = [r.ranked_responses for r in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_step", trim=trim)]
    longest = "Boil water. Add pasta. Salt it well. Stir it now and then."  # 11 words; the whole reply has 16
    # the longest passing prefix over the reply cut a sentence later, and over itself a sentence shorter
    assert out == [(longest, runaway), (longest, "Boil water. Add pasta. Salt it well.")]
    # trim_next's second pair goes down to the first sentence instead
    nxt = [r.ranked_responses for r in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_next", trim=trim)]
    assert nxt == [(longest, runaway), (longest, "Boil water.")]
    # one passing prefix: the one pair; nothing to cut: the matched pair, as trim_next
    one = "Boil salted water now. Then add the pasta and stir it for ten minutes."
    assert [r.ranked_responses for r in preferences_from_scores(PROMPT, ["Boil it.", one], scores, tb,
                                                                mode="trim_step", trim=trim)] == \
        [("Boil salted water now.", one)]
    assert [x.ranked_responses for x in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim_step")] == \
        _pairs(replies, scores, tb, "matched")


def _trim_or_matched(replies, scores, tb, trim) -> list[tuple[str, ...]]:
    from services.criteria_eval import preferences_from_scores

    return [r.ranked_responses for r in preferences_from_scores(PROMPT, replies, scores, tb, mode="trim", trim=trim)]


def test_stored_criteria_scores_are_validated_naming_the_field() -> None:
    from gateway.config import load_gateway_config
    from gateway.validation import Limits, completion_from_proto

    limits = Limits.from_config(load_gateway_config(env={}))
    good = completion([1.0, 0.0, 0.5]).to_proto()
    good.completion_id = ""  # the gateway derives it
    assert completion_from_proto(good, limits).criteria.scores == (1.0, 0.0, 0.5)
    for mutate, field in [
        (lambda m: m.criteria.scores.append(0.3), "completion.criteria.scores"),
        (lambda m: m.criteria.scores.__setitem__(1, 1.5), "completion.criteria.scores[1]"),
        (lambda m: m.criteria.ClearField("refs"), "completion.criteria.refs"),
        (lambda m: m.criteria.refs.__setitem__(0, "bad ref!"), "completion.criteria.refs[0]"),
        (lambda m: m.criteria.tie_break.extend([1.0]), "completion.criteria.tie_break"),
        (lambda m: setattr(m.criteria, "mode", "best"), "completion.criteria.mode"),
    ]:
        msg = events_pb2.Completion()
        msg.CopyFrom(good)
        mutate(msg)
        with pytest.raises(InvalidArgument) as e:
            completion_from_proto(msg, limits)
        assert e.value.field == field, field


def test_a_policy_judges_with_its_yes_probability(tiny_base) -> None:  # noqa: F811
    from services.policy_model import PolicyModel

    policy = PolicyModel.from_pretrained(str(tiny_base))
    convs = [list(judge_messages(parse_criterion({"name": "j", "judge": {"model": "p", "question": "Is it short?"}}).judge,
                                 PROMPT, reply)) for reply in ("yes", "a much longer reply than that")]
    probs = policy.yes_probability(convs)
    assert len(probs) == 2 and all(0.0 < p < 1.0 for p in probs)


from tests.unit.test_policy_lm import smollm_tokenizer_dir, tiny_base  # noqa: E402,F401 (fixtures)


@pytest.mark.parametrize("header, words", [
    ("[" * 3000, "deeper"),
    ('{"reward": ' * 3000, "deeper"),
    ('["\\ud800"]', "surrogate"),
    ('{"reward": 1e999999}', "weight"),
])
def test_hostile_op_criteria_headers_are_invalid_argument_naming_the_header(header: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_criteria_header(header)
    assert err.value.field.startswith("op-criteria") and words in str(err.value), str(err.value)
