"""TwiSTAR rewards (App. A eq. 8-11, 4.4 eq. 7) in TRL's reward-function shape."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from factory.twistar.rewards import (
    LAMBDA_HIT,
    LAMBDA_SID,
    LAMBDA_THINK,
    TOOL_LATENCY_S,
    hit_reward,
    parse_tool_calls,
    planner_reward,
    sid_reward,
    slow_reward,
    think_reward,
    valid_tool_sequence,
)

REF = "<|sid_begin|><s_a_12><s_b_3><s_c_200><|sid_end|>"
THINK20 = "<think>" + "x" * 20 + "</think>"


def _one(fn, completion, **columns):
    """Call `fn` as GRPOTrainer does, for one completion."""
    return fn(prompts=["p"], completions=[completion], completion_ids=[[1]],
              trainer_state=None, log_extra=None, log_metric=None,
              **{k: [v] for k, v in columns.items()})[0]


@pytest.mark.parametrize("text, expected", [
    (THINK20 + REF, 1.0),                                       # exactly 20 characters
    ("<think>" + "x" * 19 + "</think>" + REF, -1.0),            # 19
    ("<think>" + " " * 5 + "x" * 19 + "\n</think>", -1.0),     # whitespace is not content
    ("<think></think>" + "x" * 30, -1.0),                      # empty block
    ("x" * 30 + REF, -1.0),                                    # no block
    ("<think>" + "x" * 40, -1.0),                              # never closed
    ("x" * 40 + "</think>" + REF, 1.0),                        # opened by the chat template
    ("x" * 19 + "</think>" + REF, -1.0),                       # ... and still 20 characters
    ("Sure. " + THINK20 + REF, 1.0),                           # A.1 asks only that it exists
    (THINK20 + "<think>short</think>", 1.0),                    # the first block counts
])
def test_r_think(text, expected):
    assert _one(think_reward, text) == expected


@pytest.mark.parametrize("answer, expected", [
    (REF, 1.0),
    ("The next item is " + REF + ".", 1.0),
    ("<s_a_12><s_b_3><s_c_200>", 0.2),                          # markers missing: soft
    ("<|sid_begin|><s_b_3><s_a_12><s_c_200><|sid_end|>", 0.2),  # wrong level order
    ("<|sid_begin|><s_a_12><s_b_3><|sid_end|>", 0.2),           # a level missing
    ("<|sid_begin|> <s_a_12> <s_b_3> <s_c_200> <|sid_end|>", 0.2),  # spaced out
    ("<|sid_begin|>12 3 200<|sid_end|>", 0.2),                  # markers only
    ("<|sid_begin|><s_a_012><s_b_3><s_c_200><|sid_end|>", 0.2),  # not a vocabulary token
    ("<|sid_begin|><s_a_12><s_b_3><s_c_200><s_d_1><|sid_end|>", 0.2),  # 4 levels for 3
    ("item 12-3-200", -1.0),
    ("", -1.0),
])
def test_r_sid(answer, expected):
    assert _one(sid_reward, THINK20 + answer) == expected
    assert _one(sid_reward, THINK20 + answer, reference_sid=REF) == expected


def test_r_sid_ignores_sids_quoted_in_the_reasoning():
    assert _one(sid_reward, "<think>the user bought " + REF + " twice</think>no idea") == -1.0
    assert _one(sid_reward, REF) == 1.0                         # no reasoning: all is answer


def test_r_sid_levels_follow_the_reference():
    ref4 = "<|sid_begin|><s_a_1><s_b_2><s_c_3><s_d_0><|sid_end|>"
    assert _one(sid_reward, ref4, reference_sid=ref4) == 1.0
    assert _one(sid_reward, REF, reference_sid=ref4) == 0.2
    assert _one(sid_reward, ref4) == 0.2                       # no reference: the paper's 3


@pytest.mark.parametrize("answer, expected", [
    ("<|sid_begin|><s_a_12><s_b_3><s_c_200><|sid_end|>", 5.0),  # a, b, c
    ("<|sid_begin|><s_a_12><s_b_3><s_c_201><|sid_end|>", 2.0),  # a, b
    ("<|sid_begin|><s_a_12><s_b_4><s_c_200><|sid_end|>", 1.0),  # only a (c alone is no prefix)
    ("<|sid_begin|><s_a_13><s_b_3><s_c_200><|sid_end|>", 0.0),  # b, c match but a does not
    ("<|sid_begin|><s_b_3><s_a_12><s_c_200><|sid_end|>", 0.0),  # wrong level order
    ("<s_a_12><s_b_3>", 2.0),                                   # a soft SID is parsed too
    ("<s_a_12> <s_b_3> <s_c_200>", 5.0),                        # spaced: A.3 parses the levels
    ("<s_a_12> then <s_b_3><s_c_200>", 1.0),                    # only the first run of tokens
    ("<|sid_begin|><s_a_012><s_b_3><s_c_200><|sid_end|>", 0.0),  # <s_a_012> is no token
    ("nothing", 0.0),
])
def test_r_hit_longest_prefix(answer, expected):
    assert _one(hit_reward, "<think>" + "y" * 25 + "</think>" + answer,
                reference_sid=REF) == expected


def test_r_hit_reads_the_answer_not_the_reasoning_and_takes_code_lists():
    text = "<think>history " + REF + "</think><|sid_begin|><s_a_1><s_b_1><s_c_1><|sid_end|>"
    assert _one(hit_reward, text, reference_sid=REF) == 0.0
    assert _one(hit_reward, REF, reference_sid=[12, 3, 200]) == 5.0
    ref4 = "<|sid_begin|><s_a_12><s_b_3><s_c_200><s_d_1><|sid_end|>"   # disambiguation level
    assert _one(hit_reward, ref4, reference_sid=ref4) == 5.0
    assert _one(hit_reward, ref4.replace("s_d_1", "s_d_2"), reference_sid=ref4) == 2.0


def test_slow_reward_is_the_weighted_sum():
    assert (LAMBDA_THINK, LAMBDA_SID, LAMBDA_HIT) == (1.0, 1.0, 5.0)   # E.1.3
    cases = [
        (THINK20 + REF, 1 + 1 + 5 * 5),
        ("no reasoning " + REF, -1 + 1 + 5 * 5),
        (THINK20 + "<s_a_12><s_b_3><s_c_9>", 1 + 0.2 + 5 * 2),
        (THINK20 + "I cannot tell.", 1 - 1 + 0),
        ("", -1 - 1 + 0),
    ]
    for text, expected in cases:
        assert _one(slow_reward, text, reference_sid=REF) == pytest.approx(expected)


def test_conversational_completions_and_aligned_columns():
    """Each completion is scored against the column value at its own index."""
    refs = [REF, "<|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|>", REF]
    completions = [
        [{"role": "assistant", "content": THINK20 + REF}],
        [{"role": "assistant", "content": THINK20}, {"role": "assistant", "content": REF}],
        [{"content": "<think>" + "z" * 19 + "</think>" + refs[1]}],
    ]
    rewards = slow_reward(["p"] * 3, completions, reference_sid=refs, other=[0, 1, 2])
    assert rewards == [27.0, 1 + 1 + 5 * 0, -1 + 1 + 0]
    assert think_reward(["p"] * 3, completions) == [1.0, 1.0, -1.0]
    # strings in the standard format score the same as their conversational form
    texts = [THINK20 + REF, THINK20 + REF, "<think>" + "z" * 19 + "</think>" + refs[1]]
    assert slow_reward(["p"] * 3, texts, reference_sid=refs) == rewards
    with pytest.raises(ValueError, match="reference_sid"):
        hit_reward(["p"], [REF])
    with pytest.raises(ValueError, match="2 values for 3"):
        slow_reward(["p"] * 3, completions, reference_sid=refs[:2])


def test_called_exactly_as_grpo_trainer_does():
    """TRL 1.x: reward_func(prompts=, completions=, completion_ids=, **columns, trainer_state=,
    log_extra=, log_metric=); one float per completion."""
    prompts = [[{"role": "user", "content": "<|sid_begin|><s_a_1><s_b_1><s_c_1><|sid_end|>"}]] * 2
    completions = [[{"role": "assistant", "content": THINK20 + REF}],
                   [{"role": "assistant", "content": "fast_rec(50) rank_candidates(50, 10)"}]]
    columns = {"reference_sid": [REF, REF], "fast_candidates": [[REF], [REF]],
               "rank_scores": [[0.5], [0.5]], "slow_candidates": [None, None]}
    for fn in (think_reward, sid_reward, hit_reward, slow_reward, planner_reward):
        out = fn(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3]],
                 trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None,
                 **columns)
        assert len(out) == 2 and all(isinstance(r, float) for r in out), fn.__name__
        assert fn(prompts, completions, **columns) == out            # positional, too


def test_importable_without_heavy_dependencies():
    code = ("import sys; import factory.twistar.rewards; "
            "bad = {'torch', 'duckdb', 'numpy', 'pyarrow'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- planner, eq. 7 ---------------------------------------------------------------------------
def test_tool_sequences():
    assert parse_tool_calls("call fast_rec(50) then rank_candidates(50, 10)") == [
        ("fast_rec", (50,)), ("rank_candidates", (50, 10))]
    valid = ["fast_rec(10)", "think_and_rec(10)", "fast_rec(50)\nrank_candidates(50, 10)",
             "fast_rec(50) rank_candidates(20,20)"]
    invalid = ["", "rank_candidates(50, 10)", "fast_rec(10) rank_candidates(50, 10)",
               "fast_rec(50) rank_candidates(10, 20)", "fast_rec(0)", "think_and_rec(10, 2)",
               "fast_rec(10) think_and_rec(10)", "fast_rec(10) fast_rec(10)"]
    for text in valid:
        assert valid_tool_sequence(parse_tool_calls(text)), text
    for text in invalid:
        assert not valid_tool_sequence(parse_tool_calls(text)), text


def test_planner_reward_paths():
    fast = [f"i{k}" for k in range(50)]                 # target at fast rank 13 (index 12)
    scores = [0.0] * 50
    scores[12] = 9.0                                    # the ranker lifts it to the top
    cols = {"reference_sid": ["i12"], "fast_candidates": [fast], "rank_scores": [scores],
            "slow_candidates": [["i12", "x"]]}
    eta, beta = 0.1, 0.1
    lat = TOOL_LATENCY_S
    assert lat == {"fast_rec": 0.39, "rank_candidates": 0.14, "think_and_rec": 2.15}

    def r(text, **params):
        return planner_reward(["p"], [text], **cols, **params)[0]

    assert r("fast_rec(10)") == pytest.approx(eta - beta * 0.39)           # not in top 10
    assert r("fast_rec(50) rank_candidates(50, 10)") == pytest.approx(
        1.0 + eta - beta * (0.39 + 0.14))
    assert r("fast_rec(50) rank_candidates(10, 10)") == pytest.approx(     # not among 10
        eta - beta * (0.39 + 0.14))
    assert r("think_and_rec(10)") == pytest.approx(1.0 + eta - beta * 2.15)
    assert r("fast_rec(10) think_and_rec(10)") == pytest.approx(-beta * (0.39 + 2.15))
    assert r("I will not call anything") == 0.0
    # NDCG@10 at rank 3; eta, beta and the costs are parameters
    assert r("fast_rec(50) rank_candidates(50, 5)", eta=0.0, beta=0.0) == 1.0
    cols["slow_candidates"] = [["a", "b", "i12"]]
    assert r("think_and_rec(3)", eta=0.5, beta=1.0, tool_latency_s={"think_and_rec": 0.25}) \
        == pytest.approx(1 / math.log2(4) + 0.5 - 0.25)
    with pytest.raises(ValueError, match="slow_candidates"):
        planner_reward(["p"], ["think_and_rec(3)"], reference_sid=["i12"],
                       fast_candidates=[fast])


@pytest.mark.slow
def test_grpo_trainer_smoke(tmp_path, monkeypatch):
    """Two GRPO steps of a tiny random Llama (built from a config, no hub) with the rewards:
    TRL passes the dataset column, and logs what the functions return."""
    pytest.importorskip("trl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    vocab = ["<pad>", "<eos>", "<think>", "</think>", "<|sid_begin|>", "<|sid_end|>",
             *(f"<s_{level}_{k}>" for level in "abc" for k in range(4)), *"abcdefghij "]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(r"<[^>]*>|.", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1))
    refs = ["<|sid_begin|><s_a_1><s_b_2><s_c_3><|sid_end|>",
            "<|sid_begin|><s_a_0><s_b_2><s_c_1><|sid_end|>"]
    data = Dataset.from_dict({"prompt": ["<|sid_begin|><s_a_0><s_b_0><s_c_0><|sid_end|>"] * 4,
                              "reference_sid": refs * 2})
    seen: list[tuple[list, list, list]] = []

    def recorded(prompts, completions, **kwargs):
        out = slow_reward(prompts, completions, **kwargs)
        seen.append((completions, kwargs["reference_sid"], out))
        return out

    recorded.__name__ = "slow_reward"
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, report_to="none",
                      use_cpu=True, logging_steps=1, save_strategy="no",
                      temperature=0.7, epsilon=0.2)               # E.1.3's sampling and clip
    trainer = GRPOTrainer(model=model, reward_funcs=[recorded, sid_reward], args=args,
                          train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert len(seen) == 2
    for completions, ref_column, out in seen:
        assert len(completions) == len(ref_column) == len(out) == 4
        assert set(ref_column) <= set(refs)
        assert out == slow_reward(["p"] * 4, completions, reference_sid=ref_column)
    logged = [h["rewards/slow_reward/mean"] for h in trainer.state.log_history
              if "rewards/slow_reward/mean" in h]
    assert logged == [pytest.approx(sum(out) / 4) for _, _, out in seen]
