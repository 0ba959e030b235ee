"""A model as judge: the QLoRA paper's chatbot evaluation (Dettmers et al.
2023, Sec. 5) in miniature, the verdicts (their Elo ratings are
:mod:`qlora_lab.finetune.tournament`'s).

The paper rates chatbots by tournament: a judge (GPT-4, and humans for a
subset) sees one question and two systems' answers and says which is better;
each verdict is a game, and Elo ratings summarise the games. One detail of
the verdicts matters and is reproduced here:

* **Order.** A judge may prefer whichever answer it reads first. The paper
  found this for GPT-4 and reports both orders ("ChatGPT vs Sys" and
  "Sys vs ChatGPT" in Table 6). Here each pair is judged in both orders
  (:func:`judge_all_pairs`): :func:`order_bias` measures how often the verdict
  flips with the order, and the tournament shows each pair in one order drawn
  at random (:func:`qlora_lab.finetune.tournament.random_order_games`).

The course's judge runs offline on a CPU: :class:`Judge` wraps any chat model
(chapter 07 uses SmolLM2-135M-Instruct itself) and reads its verdict from the
next-token probabilities of the letters ``A`` and ``B``, so a verdict is a
single forward pass and deterministic. A small judge is a weak judge, which is
why :func:`agreement_with_truth` checks it against exact match on the items
whose right answer is known.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from qlora_lab.finetune import evaluate


JUDGE_INSTRUCTIONS = (
    "You are a strict judge. Below are a conversation and two candidate replies to its last message. "
    "Decide which reply is more correct, follows the instructions better and is more helpful. "
    "Answer with one letter: A or B."
)


# --------------------------------------------------------------------------- #
# 1. Asking the judge
# --------------------------------------------------------------------------- #
def conversation_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation up to its last user message, as plain text
    (``User: ...`` / ``Assistant: ...`` lines); a trailing assistant turn,
    the reference answer, is left out."""
    messages = list(messages)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the judge needs a conversation that ends with a user message")
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def judge_messages(messages: Sequence[Mapping[str, str]], reply_a: str, reply_b: str) -> list[dict]:
    """The chat the judge sees: instructions, the conversation, reply A, reply B."""
    for name, reply in (("reply_a", reply_a), ("reply_b", reply_b)):
        if not isinstance(reply, str):
            raise TypeError(f"{name} must be a string, got {type(reply).__name__}")
    body = (f"{JUDGE_INSTRUCTIONS}\n\n[Conversation]\n{conversation_text(messages)}\n\n"
            f"[Reply A]\n{reply_a.strip() or '(empty)'}\n\n[Reply B]\n{reply_b.strip() or '(empty)'}\n\n"
            "Which reply is better, A or B?")
    return [{"role": "user", "content": body}]


class Judge:
    """A chat model asked to compare two replies. ``prefers_first(...)`` is the
    probability it gives to the reply shown first (``A``): the softmax of the
    next-token logits of ``A`` and ``B`` after the assistant header."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.letter_ids = [self._single_token(letter) for letter in ("A", "B")]

    def _single_token(self, letter: str) -> int:
        ids = self.tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the judge reads its verdict from one token, but {letter!r} is {len(ids)} tokens "
                             "for this tokenizer")
        return ids[0]

    @torch.no_grad()
    def prefers_first(self, messages: Sequence[Mapping[str, str]], first: str, second: str) -> float:
        ids = self.tokenizer.apply_chat_template(judge_messages(messages, first, second), add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            logits = self.model(input_ids=torch.tensor([list(ids)], device=device)).logits[0, -1]
        finally:
            self.model.train(was_training)
        pair = logits[self.letter_ids].float()
        return float(torch.softmax(pair, dim=0)[0])


@dataclass(frozen=True)
class Verdict:
    """One judgement: ``first`` was shown as reply A, ``second`` as reply B."""

    question: int
    first: str
    second: str
    p_first: float

    @property
    def winner(self) -> str:
        return self.first if self.p_first > 0.5 else self.second


def judge_all_pairs(judge: Judge, questions: Sequence[Mapping], answers: Mapping[str, Sequence[str]]) -> list[dict]:
    """Every pair of players on every question, in both orders: a list of
    :class:`Verdict` fields as dicts (``question`` indexes ``questions``)."""
    players = list(answers)
    for p in players:
        if len(answers[p]) != len(questions):
            raise ValueError(f"player {p!r} has {len(answers[p])} answers for {len(questions)} questions")
    out = []
    for q, record in enumerate(questions):
        for a, b in itertools.combinations(players, 2):
            for first, second in ((a, b), (b, a)):
                p = judge.prefers_first(record["messages"], answers[first][q], answers[second][q])
                out.append({"question": q, "first": first, "second": second, "p_first": p})
    return out


def as_verdicts(rows: Sequence[Mapping]) -> list[Verdict]:
    """:class:`Verdict` objects from the dicts that :func:`judge_all_pairs` writes."""
    return [Verdict(int(r["question"]), str(r["first"]), str(r["second"]), float(r["p_first"])) for r in rows]



def verdicts_by_pair(verdicts: Sequence[Verdict]) -> dict[tuple, tuple[Verdict, Verdict]]:
    """The two verdicts of each question and pair of players, ``{(question,
    frozenset({a, b})): (verdict, verdict in the other order)}``; an error
    unless every pair was judged once in each order."""
    by_pair: dict[tuple, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_pair[(v.question, frozenset((v.first, v.second)))].append(v)
    out = {}
    for key, vs in by_pair.items():
        if len(vs) != 2 or vs[0].first != vs[1].second:
            raise ValueError(f"question {key[0]}, pair {sorted(key[1])}: expected one verdict in each order, "
                             f"got {len(vs)}")
        out[key] = (vs[0], vs[1])
    return out


# --------------------------------------------------------------------------- #
# 2. How far to trust the judge
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class OrderBias:
    pairs: int              # (question, pair of players) judged in both orders
    consistent: int         # the same player wins in both orders
    first_wins_both: int    # the reply shown first wins in both orders
    second_wins_both: int   # the reply shown second wins in both orders
    first_win_rate: float   # share of all verdicts won by the reply shown first

    def __str__(self) -> str:
        return (f"{self.pairs} pairs judged in both orders: same winner in {self.consistent} "
                f"({self.consistent / self.pairs:.1%}); the first reply won both orders in {self.first_wins_both}, "
                f"the second in {self.second_wins_both}; first position wins {self.first_win_rate:.1%} of verdicts")


def order_bias(verdicts: Sequence[Verdict]) -> OrderBias:
    """Position bias: the same pair of replies in both orders. An unbiased judge
    gives the same winner both times; a judge that always picks reply A is
    inconsistent on every pair."""
    pairs = verdicts_by_pair(verdicts)
    if not pairs:
        raise ValueError("order_bias needs verdicts")
    consistent = sum(v1.winner == v2.winner for v1, v2 in pairs.values())
    first_both = sum(v1.p_first > 0.5 and v2.p_first > 0.5 for v1, v2 in pairs.values())
    second_both = sum(v1.p_first <= 0.5 and v2.p_first <= 0.5 for v1, v2 in pairs.values())
    first_rate = sum(v.p_first > 0.5 for v in verdicts) / len(verdicts)
    return OrderBias(len(pairs), consistent, first_both, second_both, first_rate)


@dataclass(frozen=True)
class Agreement:
    items: int       # verdicts on pairs where exactly one reply is right by exact match
    agree: int       # of those, verdicts that pick the right reply
    both_orders: int  # (question, pair) where the right reply wins in both orders
    pairs: int

    @property
    def rate(self) -> float:
        return self.agree / self.items if self.items else float("nan")

    def __str__(self) -> str:
        return (f"{self.items} verdicts where exactly one reply is right: the judge picks it in {self.agree} "
                f"({self.rate:.1%}); in both orders on {self.both_orders} of {self.pairs} pairs")


def agreement_with_truth(verdicts: Sequence[Verdict], questions: Sequence[Mapping],
                         answers: Mapping[str, Sequence[str]]) -> Agreement:
    """The judge against exact match, on the scored questions where one reply of
    the pair is right and the other wrong (a coin would score 50%)."""
    right = {}
    for p, replies in answers.items():
        for q, record in enumerate(questions):
            if record.get("answer") is not None:
                right[(p, q)] = evaluate.is_correct(replies[q], record["answer"])
    items = agree = both = pairs = 0
    for (q, _), (v1, v2) in verdicts_by_pair(verdicts).items():
        a, b = v1.first, v1.second
        if (a, q) not in right or right[(a, q)] == right[(b, q)]:
            continue
        truth = a if right[(a, q)] else b
        pairs += 1
        both += v1.winner == truth and v2.winner == truth
        for v in (v1, v2):
            items += 1
            agree += v.winner == truth
    return Agreement(items, agree, both, pairs)
