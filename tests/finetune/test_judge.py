"""qlora_lab.finetune.judge and tournament: verdicts in both orders, order bias, agreement with exact
match, and Elo over random orderings of the games."""

import types

import pytest
import torch

from qlora_lab.finetune import judge as J
from qlora_lab.finetune import tournament as T


def V(q, first, second, p):
    return J.Verdict(q, first, second, p)


def test_elo_update_matches_the_formula_and_conserves_points():
    r = T.elo([("a", "b", 1.0)], ["a", "b"])
    assert r["a"] == pytest.approx(1016.0) and r["b"] == pytest.approx(984.0)
    r = T.elo([("a", "b", 1.0), ("a", "b", 1.0)], ["a", "b"])
    expected = 1 / (1 + 10 ** ((984 - 1016) / 400))
    assert r["a"] == pytest.approx(1016 + 32 * (1 - expected))
    assert sum(r.values()) == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="among the players"):
        T.elo([("a", "c", 1.0)], ["a", "b"])


def test_elo_depends_on_the_order_of_games_and_the_orderings_average_it():
    games = [("a", "b", 1.0)] * 3 + [("a", "b", 0.0)] * 3
    assert T.elo(games, ["a", "b"])["a"] != T.elo(games[::-1], ["a", "b"])["a"]
    rows = T.elo_over_orderings(games, ["a", "b"], orderings=400, seed=1)
    by = {row.player: row for row in rows}
    assert by["a"].mean == pytest.approx(1000.0, abs=3.0)  # even record: about equal on average
    assert by["a"].low < 1000 < by["a"].high
    strong = T.elo_over_orderings([("a", "b", 1.0)] * 5 + [("b", "c", 1.0)] * 5, ["a", "b", "c"], orderings=50)
    assert [row.player for row in strong] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="orderings"):
        T.elo_over_orderings(games, ["a", "b"], orderings=0)


def test_order_bias_of_a_judge_that_always_picks_the_first_reply():
    always_first = [V(q, a, b, 0.9) for q in range(3) for a, b in (("x", "y"), ("y", "x"))]
    bias = J.order_bias(always_first)
    assert (bias.pairs, bias.consistent, bias.first_wins_both, bias.first_win_rate) == (3, 0, 3, 1.0)
    fair = [V(0, "x", "y", 0.8), V(0, "y", "x", 0.3)]
    bias = J.order_bias(fair)
    assert (bias.consistent, bias.first_wins_both, bias.second_wins_both) == (1, 0, 0)
    with pytest.raises(ValueError, match="each order"):
        J.order_bias([V(0, "x", "y", 0.8)])


def test_agreement_with_truth_only_counts_pairs_with_one_right_reply():
    questions = [{"answer": "13:29"}, {"answer": "2024-01-02"}, {"answer": None}]
    answers = {"p": ["13:29", "2024-01-02", "hi"], "q": ["01:29", "2024-01-02", "hello"]}
    verdicts = [V(q, a, b, p) for q, a, b, p in [
        (0, "p", "q", 0.7), (0, "q", "p", 0.6),   # right reply wins once (in first position), loses once
        (1, "p", "q", 0.9), (1, "q", "p", 0.9),   # both right: not counted
        (2, "p", "q", 0.1), (2, "q", "p", 0.1)]]  # no truth: not counted
    agreement = J.agreement_with_truth(verdicts, questions, answers)
    assert (agreement.items, agreement.agree, agreement.both_orders, agreement.pairs) == (2, 1, 0, 1)
    assert agreement.rate == 0.5


def test_games_one_per_pair_random_order_and_both_orders():
    verdicts = [V(0, "x", "y", 0.9), V(0, "y", "x", 0.9), V(1, "x", "y", 0.2), V(1, "y", "x", 0.8)]
    games = T.random_order_games(verdicts, seed=0)
    assert len(games) == 2
    for a, b, s in games:
        assert s in (0.0, 1.0) and {a, b} == {"x", "y"}
    # question 1: y wins in both orders -> y beats x; question 0 flips with the order -> a tie
    assert sorted(T.both_order_games(verdicts)) == [("x", "y", 0.0), ("x", "y", 0.5)]
    shown_first = {T.random_order_games(verdicts, seed=s)[0][0] for s in range(20)}
    assert shown_first == {"x", "y"}
    wins = T.win_matrix([("x", "y", 1.0), ("x", "y", 0.5)], ["x", "y"])
    assert wins[("x", "y")] == 0.75 and wins[("y", "x")] == 0.25


class _LetterModel(torch.nn.Module):
    """Stands in for a chat model: favours the letter whose reply is longer."""

    def __init__(self, tokenizer):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer

    def forward(self, input_ids):
        text = self.tokenizer.last_text
        a = text.split("[Reply A]\n")[1].split("\n\n[Reply B]")[0]
        b = text.split("[Reply B]\n")[1].split("\n\n")[0]
        logits = torch.zeros(1, input_ids.shape[1], 4)
        logits[0, -1, 1] = float(len(a))
        logits[0, -1, 2] = float(len(b))
        return types.SimpleNamespace(logits=logits)


class _Tokenizer:
    vocab = {"A": 1, "B": 2, "AB": 3}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]] if text in self.vocab else [0, 0]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        self.last_text = messages[0]["content"]
        return [0] * 7


def test_judge_reads_the_letters_and_judges_every_pair_in_both_orders():
    tok = _Tokenizer()
    judge = J.Judge(_LetterModel(tok), tok)
    convo = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "reference"}]
    p = judge.prefers_first(convo, "a long reply", "short")
    assert p == pytest.approx(torch.softmax(torch.tensor([12.0, 5.0]), 0)[0].item())
    assert "reference" not in tok.last_text and "User: Say something." in tok.last_text
    rows = J.judge_all_pairs(judge, [{"messages": convo}], {"u": ["xx"], "v": ["xxxx"], "w": ["x"]})
    assert len(rows) == 6
    bias = J.order_bias(J.as_verdicts(rows))
    assert bias.consistent == 3  # a length-only judge has no position bias
    with pytest.raises(ValueError, match="answers for"):
        J.judge_all_pairs(judge, [{"messages": convo}], {"u": ["a", "b"], "v": ["c"]})
    with pytest.raises(TypeError, match="reply_a"):
        J.judge_messages(convo, None, "x")
    with pytest.raises(ValueError, match="ends with a user message"):
        J.conversation_text([{"role": "assistant", "content": "hi"}])
