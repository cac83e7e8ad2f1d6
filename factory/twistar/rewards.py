"""TwiSTAR rewards: the slow model's GRPO reward (App. A, eq. 8-11) and the planner's R_total
(4.4, eq. 7), as reward functions for TRL's `GRPOTrainer(reward_funcs=[...])`.

Every function has TRL's reward-function shape, `f(prompts, completions, **kwargs) ->
list[float]`: TRL (1.x, `GRPOTrainer._calculate_rewards`) calls it with the keywords
`prompts=`, `completions=`, `completion_ids=`, every dataset column except prompt/completion
as a list aligned with the completions (e.g. `reference_sid=[...]`), and `trainer_state`,
`log_extra`, `log_metric`; unknown keywords are ignored here. A completion is a string
(standard format) or a list of `{"role", "content"}` messages (conversational format).

    from factory.twistar.rewards import slow_reward
    GRPOTrainer(..., reward_funcs=slow_reward)   # dataset column `reference_sid`

or, to log each term on its own, `reward_funcs=[think_reward, sid_reward, hit_reward]` with
`GRPOConfig(reward_weights=[LAMBDA_THINK, LAMBDA_SID, LAMBDA_HIT])`, which sums to the same.

Stdlib only: importable by a training script without torch, duckdb or the warehouse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

SID_BEGIN, SID_END = "<|sid_begin|>", "<|sid_end|>"        # App. A.2 strict format
PAPER_LEVELS = 3             # App. A.2 (<s_a_#><s_b_#><s_c_#>), A.3 (levels a, b, c); E.1: L = 3

# App. A.1, eq. 9: a <think>...</think> block of at least 20 characters -> +1, else -1
THINK_MIN_CHARS = 20
R_THINK_OK, R_THINK_MISSING = 1.0, -1.0
# App. A.2, eq. 10: strict SID +1, soft SID pattern +0.2, no SID -1
R_SID_STRICT, R_SID_SOFT, R_SID_NONE = 1.0, 0.2, -1.0
# App. A.3, eq. 11: longest matching prefix none / a / ab / abc -> 0 / 1 / 2 / 5
R_HIT_BY_PREFIX = (0.0, 1.0, 2.0, 5.0)
# E.1.3: "lambda_hit = 5.0 and lambda_format = 1.0"; eq. 8 names lambda_think and lambda_sid,
# both format terms (A.1, A.2), so both take lambda_format
LAMBDA_FORMAT = 1.0
LAMBDA_THINK = LAMBDA_SID = LAMBDA_FORMAT
LAMBDA_HIT = 5.0

# 4.4, eq. 7: R_total = NDCG@10(final list) + eta * 1[valid tool sequence] - beta * latency
NDCG_AT = 10
# The paper gives no values for eta and beta (E.1.4, the planner's details, has no text in
# our copy). These defaults are factory's choice, not the paper's: a valid call sequence earns
# 0.1, and each second of latency costs 0.1, so slow reasoning (1.76 s more than fast_rec,
# App. E) must raise NDCG@10 by more than 0.176 to pay for itself.
ETA = 0.1
BETA = 0.1
# Latency cost of each tool call in seconds (App. E: one A100, batch size 1, Beauty test set).
TOOL_LATENCY_S: dict[str, float] = {
    # App. E: the fast model takes 0.39 s/sample
    "fast_rec": 0.39,
    # App. E gives no absolute figure for the ranker. Derived: removing it cuts the full
    # model's cost to 0.94x (6.2) of 0.65 s/sample (App. E), saving 0.039 s over all
    # sequences, and the planner ranks 27.1% of them (6.5): 0.039 / 0.271 = 0.14 s a call
    "rank_candidates": 0.14,
    # App. E: a sequence routed to slow reasoning takes 2.15 s/sample (0.39 + 1.76 overhead);
    # Path 3 (4.4) calls think_and_rec alone, so the call carries the whole 2.15 s
    "think_and_rec": 2.15,
}

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_LEVEL = re.compile(r"<s_([a-z])_(0|[1-9]\d*)>")  # a vocabulary token: no leading zeros
_SOFT = re.compile(r"<s_[a-z]_\d+>|<\|?\s*sid_begin\s*\|?>.*?<\|?\s*sid_end\s*\|?>",
                   re.DOTALL | re.IGNORECASE)
_TOOL = re.compile(r"\b(fast_rec|rank_candidates|think_and_rec)\s*\(\s*(\d+)\s*"
                   r"(?:,\s*(\d+)\s*)?\)")


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The generated text: a string as is, or the contents of a conversational completion's
    assistant messages (a message without a role counts as the assistant's)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion
                   if m.get("role", "assistant") == "assistant")


def _strict_sid(levels: int) -> re.Pattern[str]:
    tokens = "".join(f"<s_{chr(ord('a') + k)}_(0|[1-9]\\d*)>" for k in range(levels))
    return re.compile(re.escape(SID_BEGIN) + tokens + re.escape(SID_END))


def _answer(text: str) -> str:
    """What follows the reasoning: the text after the first </think>, or all of it. SIDs
    quoted inside the reasoning (history items) are not the recommendation."""
    head, sep, tail = text.partition("</think>")
    return tail if sep else head


def parse_sid(sid: str | Sequence[int]) -> tuple[int, ...]:
    """A reference SID's codes, from its token form (App. A.2) or a list of codes."""
    if isinstance(sid, str):
        codes = _LEVEL.findall(sid)
        if not codes or [c[0] for c in codes] != [chr(ord("a") + k) for k in range(len(codes))]:
            raise ValueError(f"not a SID in <s_a_#><s_b_#>... form: {sid!r}")
        return tuple(int(c[1]) for c in codes)
    return tuple(int(c) for c in sid)


def _levels(reference: str | Sequence[int] | None, sid_levels: int | None) -> int:
    """Levels of the strict format: as asked, else the reference's (a SID run with a
    disambiguation level has 4), else the paper's 3."""
    if sid_levels is not None:
        return sid_levels
    return len(parse_sid(reference)) if reference is not None else PAPER_LEVELS


def predicted_codes(text: str, levels: int = PAPER_LEVELS) -> list[tuple[str, int]]:
    """The recommended SID as (level letter, code) pairs, in the order written: the first
    strict SID of the answer, else its first run of level tokens with nothing but spaces
    between them (a soft SID; App. A.3 parses both SIDs into their levels)."""
    answer = _answer(text)
    strict = _strict_sid(levels).search(answer)
    if strict:
        return [(chr(ord("a") + k), int(c)) for k, c in enumerate(strict.groups())]
    run: list[tuple[str, int]] = []
    end = None
    for m in _LEVEL.finditer(answer):
        if run and answer[end:m.start()].strip():
            break
        run.append((m.group(1), int(m.group(2))))
        end = m.end()
    return run


def think_score(text: str) -> float:
    """Eq. 9: +1 when a <think>...</think> block holds at least 20 characters (App. A.1;
    counted after stripping surrounding whitespace, so an empty block never passes). The
    paper asks only that the block exists, not that it comes first. A completion that
    closes a block it never opened counts as one: chat templates of reasoning models
    (Qwen3, R1) put the opening <think> in the prompt."""
    m = _THINK.search(text)
    if m:
        thought = m.group(1)
    else:
        thought, closed, _ = text.partition("</think>")
        if not closed:
            return R_THINK_MISSING
    return R_THINK_OK if len(thought.strip()) >= THINK_MIN_CHARS else R_THINK_MISSING


def sid_score(text: str, levels: int = PAPER_LEVELS) -> float:
    """Eq. 10 on the answer (after </think>): +1 for `<|sid_begin|><s_a_#><s_b_#><s_c_#>
    <|sid_end|>` (no spaces, levels in order), +0.2 for anything that resembles a SID
    (App. A.2's soft match: a level token `<s_x_#>`, or sid_begin/sid_end markers around
    something; wrong order, missing levels or markers, spacing), else -1."""
    answer = _answer(text)
    if _strict_sid(levels).search(answer):
        return R_SID_STRICT
    return R_SID_SOFT if _SOFT.search(answer) else R_SID_NONE


def hit_score(text: str, reference: str | Sequence[int], levels: int | None = None) -> float:
    """Eq. 11: the longest prefix of the predicted SID equal to the reference, level by
    level in the order written (a wrong level order matches nothing): 0 / 1 / 2 / 5 for
    none / a / ab / abc. With more than 3 levels (a disambiguation level) only the whole
    SID earns 5 and any longer partial prefix earns 2."""
    ref = parse_sid(reference)
    pred = predicted_codes(text, _levels(reference, levels))
    k = 0
    for (letter, code), want in zip(pred, ref, strict=False):
        if letter != chr(ord("a") + k) or code != want:
            break
        k += 1
    if k == 0:
        return R_HIT_BY_PREFIX[0]
    if k == len(ref):
        return R_HIT_BY_PREFIX[-1]
    return R_HIT_BY_PREFIX[min(k, len(R_HIT_BY_PREFIX) - 2)]


def _column(kwargs: Mapping[str, Any], name: str, n: int, fn: str) -> list[Any]:
    values = kwargs.get(name)
    if values is None:
        raise ValueError(f"{fn} needs the dataset column {name!r} (one value per completion)")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{fn}: column {name!r} has {len(values)} values for {n} completions")
    return values


# -- TRL reward functions --------------------------------------------------------------------
def think_reward(prompts: Sequence[Any], completions: Sequence[Any],
                 **kwargs: Any) -> list[float]:
    """r_think (App. A.1, eq. 9) per completion."""
    return [think_score(completion_text(c)) for c in completions]


def sid_reward(prompts: Sequence[Any], completions: Sequence[Any], *,
               sid_levels: int | None = None, **kwargs: Any) -> list[float]:
    """r_sid (App. A.2, eq. 10) per completion; the strict format has as many levels as
    `reference_sid` where that column exists, else 3."""
    refs = kwargs.get("reference_sid") or [None] * len(completions)
    return [sid_score(completion_text(c), _levels(r, sid_levels))
            for c, r in zip(completions, refs, strict=True)]


def hit_reward(prompts: Sequence[Any], completions: Sequence[Any], *,
               sid_levels: int | None = None, **kwargs: Any) -> list[float]:
    """r_hit (App. A.3, eq. 11) against the dataset column `reference_sid`."""
    refs = _column(kwargs, "reference_sid", len(completions), "hit_reward")
    return [hit_score(completion_text(c), r, sid_levels)
            for c, r in zip(completions, refs, strict=True)]


def slow_reward(prompts: Sequence[Any], completions: Sequence[Any], *,
                lambda_think: float = LAMBDA_THINK, lambda_sid: float = LAMBDA_SID,
                lambda_hit: float = LAMBDA_HIT, sid_levels: int | None = None,
                **kwargs: Any) -> list[float]:
    """R_slow = lambda_think r_think + lambda_sid r_sid + lambda_hit r_hit (App. A, eq. 8;
    weights E.1.3), for M_slow's GRPO on hard samples (4.3). Needs `reference_sid`."""
    refs = _column(kwargs, "reference_sid", len(completions), "slow_reward")
    out = []
    for c, ref in zip(completions, refs, strict=True):
        text = completion_text(c)
        levels = _levels(ref, sid_levels)
        out.append(lambda_think * think_score(text) + lambda_sid * sid_score(text, levels)
                   + lambda_hit * hit_score(text, ref, levels))
    return out


# -- the planner (4.4, eq. 7) ----------------------------------------------------------------
def parse_tool_calls(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The tool calls written, in order: `fast_rec(k)`, `rank_candidates(m, n)`,
    `think_and_rec(j)` (4.4)."""
    return [(m.group(1), tuple(int(g) for g in m.groups()[1:] if g is not None))
            for m in _TOOL.finditer(text)]


def valid_tool_sequence(calls: Sequence[tuple[str, tuple[int, ...]]]) -> bool:
    """One of the planner's three paths (4.4, 6.5), with positive sizes: fast_rec(k);
    fast_rec(k) then rank_candidates(m, n) with n <= m <= k (the ranker reorders the fast
    candidates); think_and_rec(j)."""
    names = [name for name, _ in calls]
    args = [a for _, a in calls]
    arity = {"fast_rec": 1, "rank_candidates": 2, "think_and_rec": 1}
    if any(len(a) != arity[n] or min(a) < 1 for n, a in calls):
        return False
    if names in (["fast_rec"], ["think_and_rec"]):
        return True
    if names == ["fast_rec", "rank_candidates"]:
        (k,), (m, n) = args
        return n <= m <= k
    return False


def ndcg_at(ranked: Sequence[Any], target: Any, k: int = NDCG_AT) -> float:
    """NDCG@k with one relevant item (leave-one-out, section 5): 1/log2(rank + 1)."""
    for rank, item in enumerate(ranked[:k], start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def final_list(calls: Sequence[tuple[str, tuple[int, ...]]], fast: Sequence[Any] | None,
               rank_scores: Sequence[float] | None, slow: Sequence[Any] | None) -> list[Any]:
    """The final ranked list of a valid call sequence, from the frozen tools' precomputed
    outputs (Algorithm 1, line 11: the tools do not change during the planner's RL)."""
    name, args = calls[-1]
    if name == "think_and_rec":
        if slow is None:
            raise ValueError("think_and_rec needs the column 'slow_candidates'")
        return list(slow[:args[0]])
    if fast is None:
        raise ValueError("fast_rec needs the column 'fast_candidates'")
    if name == "fast_rec":
        return list(fast[:args[0]])
    if rank_scores is None:
        raise ValueError("rank_candidates needs the column 'rank_scores'")
    m, n = args
    pool = list(range(min(m, len(fast))))
    pool.sort(key=lambda i: -rank_scores[i])          # stable: ties keep the fast order
    return [fast[i] for i in pool[:n]]


def planner_reward(prompts: Sequence[Any], completions: Sequence[Any], *, eta: float = ETA,
                   beta: float = BETA, tool_latency_s: Mapping[str, float] | None = None,
                   ndcg_k: int = NDCG_AT, **kwargs: Any) -> list[float]:
    """R_total (4.4, eq. 7) of each planner completion (its tool calls).

    Dataset columns: `reference_sid` (the ground truth, in the candidates' key space),
    `fast_candidates` (M_fast's beam, best first, at least as long as any k asked),
    `rank_scores` (M_rank's score of each fast candidate, higher first) and
    `slow_candidates` (M_slow's beam); a column is needed only when a call uses it.
    An invalid sequence earns no list (NDCG 0) and no process reward, and still pays
    the latency of the calls it wrote. Latency is the sum of the calls' costs (seconds).
    """
    latency = dict(TOOL_LATENCY_S if tool_latency_s is None else tool_latency_s)
    n = len(completions)
    refs = _column(kwargs, "reference_sid", n, "planner_reward")
    cols = {c: kwargs.get(c) or [None] * n
            for c in ("fast_candidates", "rank_scores", "slow_candidates")}
    out = []
    for i, c in enumerate(completions):
        calls = parse_tool_calls(completion_text(c))
        valid = valid_tool_sequence(calls)
        outcome = ndcg_at(final_list(calls, cols["fast_candidates"][i], cols["rank_scores"][i],
                                     cols["slow_candidates"][i]), refs[i], ndcg_k) \
            if valid else 0.0
        cost = sum(latency[name] for name, _ in calls)
        out.append(outcome + eta * float(valid) - beta * cost)
    return out
