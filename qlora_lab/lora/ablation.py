"""Small LoRA ablations on cached activations (chapter 04, sections 2, 7 and 8).

An ablation trains many adapters on the same data, which on a CPU is too slow
for a whole model. What is frozen need not be recomputed: when only the last
blocks change, what enters them is the same at every step, so we run the
model once, keep it, and train on the last blocks alone.

Read it in this order:

1. :func:`fit`: full-batch AdamW on a function that returns logits; the one
   training loop of chapter 04's experiments.
2. :func:`capture_tail_inputs`: run the model once and keep what enters its
   last ``n_blocks`` decoder blocks (:class:`TailInputs`); :func:`run_tail`
   runs blocks from there (the model's own, bit for bit), :func:`tail_logits`
   adds the final norm and the output head.
3. :func:`tail`: a copy of the last blocks with adapters on ``targets``, or
   with every weight trainable (full finetuning).
4. :class:`PlacementStudy`: where adapters go (QLoRA Sec. 4, Figure 2) in
   miniature. A code that follows a rule (every fruit means "anchor"), learned
   from some words of each category and tested on held-out ones.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora_lab.lora.surgery import add_lora, trainable_parameters

__all__ = ["CATEGORIES", "CODE_WORDS", "PLACEMENTS", "PROMPT", "PlacementStudy", "RunResult", "TailInputs",
           "capture_tail_inputs", "fit", "last_blocks", "openmp_threads", "run_tail", "split_words",
           "tail", "tail_logits"]


# -- 1. The loop --------------------------------------------------------------
def fit(parameters: Sequence[torch.Tensor], logits: Callable[[], torch.Tensor], labels: torch.Tensor,
        steps: int = 100, lr: float = 1e-3) -> None:
    """Train ``parameters`` for ``steps`` full-batch AdamW steps (no weight
    decay) on the cross-entropy of ``logits()`` against ``labels``."""
    parameters = list(parameters)
    if not parameters or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in parameters):
        raise ValueError("fit needs a non-empty list of tensors with requires_grad=True (the adapter's "
                         "lora_A and lora_B, say); got none, or one that is frozen.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(logits(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# -- 2. What enters the last blocks, kept once --------------------------------
#: The keyword arguments a decoder block receives from the model that do not
#: depend on the block (the cache is left out: nothing is generated here).
LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


@dataclass
class TailInputs:
    """What the model feeds its last blocks for one batch of prompts."""

    hidden: torch.Tensor   # (batch, sequence, hidden): the input of the first block of the tail
    layer_kwargs: dict     # the mask and rotary position embeddings every block receives
    output: torch.Tensor   # what the model's last block put out, to check a recomputed tail against


def last_blocks(model: nn.Module, n_blocks: int) -> list[nn.Module]:
    """The model's last ``n_blocks`` decoder blocks (the model's own, not copies)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not (isinstance(blocks, nn.ModuleList) and hasattr(model.model, "norm")
            and callable(getattr(model, "get_output_embeddings", None))):
        raise ValueError(f"expected a LLaMA-style causal language model (model.model.layers, model.model.norm "
                         f"and an output head), like SmolLM2; got {type(model).__name__}.")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 1 <= n_blocks <= len(blocks):
        raise ValueError(f"n_blocks must be an integer from 1 to {len(blocks)} (the model's blocks), "
                         f"got {n_blocks!r}")
    return list(blocks[len(blocks) - n_blocks:])


def capture_tail_inputs(model: nn.Module, batch: dict, n_blocks: int) -> TailInputs:
    """Run ``model`` once on ``batch`` and keep the input of its last ``n_blocks``
    blocks (and the last block's output)."""
    blocks = last_blocks(model, n_blocks)
    kept = {}

    def keep_input(module, args, kwargs):
        kept["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        kept["layer_kwargs"] = {k: kwargs[k] for k in LAYER_KWARGS if k in kwargs}

    def keep_output(module, args, output):
        kept["output"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True),
               blocks[-1].register_forward_hook(keep_output)]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return TailInputs(kept["hidden"], kept["layer_kwargs"], kept["output"])


def run_tail(blocks: Sequence[nn.Module], inputs: TailInputs) -> torch.Tensor:
    """What ``blocks`` put out on the cached input, every position."""
    hidden = inputs.hidden
    for block in blocks:
        hidden = block(hidden, **inputs.layer_kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def tail_logits(model: nn.Module, blocks: Sequence[nn.Module], inputs: TailInputs,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The logits at the last position when ``blocks`` replace the model's last
    ``len(blocks)`` blocks; only the tokens in ``candidates``, if given."""
    hidden = run_tail(blocks, inputs)
    head = model.get_output_embeddings()
    weight = head.weight if candidates is None else head.weight[candidates]
    bias = None if head.bias is None else (head.bias if candidates is None else head.bias[candidates])
    return F.linear(model.model.norm(hidden[:, -1]), weight, bias)


# -- 3. The blocks to train ---------------------------------------------------
def tail(model: nn.Module, n_blocks: int, targets: str | Sequence[str] | None, r: int | None = None,
         alpha: float = 16.0) -> nn.ModuleList:
    """A copy of the last ``n_blocks`` blocks: with rank-``r`` adapters on
    ``targets`` (``add_lora``'s ``target_modules``: ``["q_proj", "v_proj"]``,
    ``"all-linear"``, ...), or, with ``targets=None``, every weight trainable."""
    copied = nn.ModuleList(copy.deepcopy(list(last_blocks(model, n_blocks))))
    if targets is None:
        if r is not None:
            raise ValueError("full finetuning (targets=None) has no rank; leave r out, or name targets for LoRA")
        return copied.requires_grad_(True)
    if r is None:
        raise ValueError(f"adapters on {targets!r} need a rank r (4, 16, 64, ...)")
    add_lora(copied, r=r, alpha=alpha, target_modules=targets)
    return copied


# -- 4. Where the adapters go (QLoRA Sec. 4, Figure 2), in miniature ----------
#: Eight categories of twelve words, each word a single SmolLM2 token (with its leading space).
CATEGORIES = {category: tuple(words.split()) for category, words in {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum lime berry",
    "animal": "dog cat horse tiger lion rabbit wolf bear mouse sheep goat fox",
    "body": "hand foot head arm leg eye ear nose mouth knee neck finger",
    "job": "doctor teacher farmer lawyer nurse pilot baker chef judge soldier engineer artist",
    "country": "France Spain Italy Japan China India Brazil Egypt Canada Mexico Germany Russia",
    "metal": "iron copper silver gold zinc lead steel tin nickel bronze brass aluminum",
    "weather": "rain snow wind storm fog hail thunder cloud frost sun mist ice",
    "vehicle": "car bus train truck bike boat ship plane taxi tram van tractor",
}.items()}
#: The code word of each category, in the order of CATEGORIES: every fruit means "anchor".
CODE_WORDS = ("anchor", "candle", "mirror", "pencil", "ribbon", "wallet", "ladder", "pillow")
PROMPT = "In the secret code, {word} means"
#: The two placements QLoRA compares (Sec. 4): LoRA's default, and every linear layer.
PLACEMENTS = {"q, v": ("q_proj", "v_proj"), "all linear": "all-linear"}


def split_words(train_per_category: int, seed: int = 0) -> tuple[list[str], list[int], list[str], list[int]]:
    """``(train words, their categories, held-out words, their categories)``:
    ``train_per_category`` words of each category, drawn with ``seed``, for
    training; the others held out."""
    smallest = min(len(words) for words in CATEGORIES.values())
    if isinstance(train_per_category, bool) or not isinstance(train_per_category, int) or \
            not 1 <= train_per_category < smallest:
        raise ValueError(f"train_per_category must be an integer from 1 to {smallest - 1}, so that every "
                         f"category keeps a held-out word; got {train_per_category!r}")
    generator = torch.Generator().manual_seed(seed)
    train, train_labels, held_out, held_out_labels = [], [], [], []
    for label, words in enumerate(CATEGORIES.values()):
        order = torch.randperm(len(words), generator=generator).tolist()
        for k, i in enumerate(order):
            words_list, labels = (train, train_labels) if k < train_per_category else (held_out, held_out_labels)
            words_list.append(words[i])
            labels.append(label)
    return train, train_labels, held_out, held_out_labels


@contextlib.contextmanager
def openmp_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` OpenMP threads (``None``: leave torch's
    setting), and give the caller's count back afterwards, also on error."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (torch's own setting), got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class RunResult:
    """One point of the study: what was trained and how well it did."""

    trainable: int
    train_loss: float
    heldout_loss: float
    heldout_accuracy: float


@dataclass
class PlacementStudy:
    """The category code of :data:`CATEGORIES`, trained on the last
    ``n_blocks`` blocks from cached inputs (:meth:`build`); :meth:`run`
    trains one placement and measures it on the held-out words.

    ``threads``: the OpenMP threads of the capture and of every run
    (``None``: torch's setting). One by default: the matrices are small (336
    x 576 activations for one block), and on a shared two-core machine five
    all-linear steps took 0.4 s on one thread against 1.0 to 1.6 s on two with
    three other jobs running and 12 s with seven; the capture took 1.6 s
    against 12 s (two threads wait on each other). On one thread the study
    also gives the same numbers whatever the notebook's thread count.
    """

    model: nn.Module
    candidates: torch.Tensor   # the token ids of CODE_WORDS
    train: TailInputs
    heldout: TailInputs
    train_labels: torch.Tensor
    heldout_labels: torch.Tensor
    train_words: list[str]
    heldout_words: list[str]
    n_blocks: int = 1
    steps: int = 30
    lr: float = 1e-3
    alpha: float = 16.0
    seed: int = 0
    threads: int | None = 1

    @classmethod
    def build(cls, model: nn.Module, tokenizer, *, n_blocks: int = 1, train_per_category: int = 6,
              split_seed: int = 0, **settings) -> "PlacementStudy":
        """Split the words, run ``model`` once on every prompt and keep what
        enters its last ``n_blocks`` blocks. ``settings``: ``steps``, ``lr``,
        ``alpha``, ``seed`` and ``threads`` of every run."""
        unknown = set(settings) - {"steps", "lr", "alpha", "seed", "threads"}
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; the settings are steps, lr, alpha, seed and "
                             f"threads")
        ids = {}
        for word in (*CODE_WORDS, *(w for words in CATEGORIES.values() for w in words)):
            tokens = tokenizer(" " + word, add_special_tokens=False).input_ids
            if len(tokens) != 1:
                raise ValueError(f"{word!r} is {len(tokens)} tokens for this tokenizer; the study needs every "
                                 f"word to be one token (it was written for SmolLM2's tokenizer)")
            ids[word] = tokens[0]
        train_words, train_labels, heldout_words, heldout_labels = split_words(train_per_category, split_seed)
        with openmp_threads(settings.get("threads", 1)):
            inputs = [capture_tail_inputs(model, tokenizer([PROMPT.format(word=w) for w in words],
                                                           return_tensors="pt"), n_blocks)
                      for words in (train_words, heldout_words)]
        study = cls(model, torch.tensor([ids[w] for w in CODE_WORDS]), inputs[0], inputs[1],
                    torch.tensor(train_labels), torch.tensor(heldout_labels), train_words, heldout_words,
                    n_blocks, **settings)
        return study

    def measure(self, blocks: nn.ModuleList) -> RunResult:
        """Losses and held-out accuracy of ``blocks`` in place of the model's last blocks."""
        with torch.no_grad():
            train_logits = tail_logits(self.model, blocks, self.train, self.candidates)
            heldout_logits = tail_logits(self.model, blocks, self.heldout, self.candidates)
        return RunResult(trainable_parameters(blocks).trainable,
                         F.cross_entropy(train_logits, self.train_labels).item(),
                         F.cross_entropy(heldout_logits, self.heldout_labels).item(),
                         (heldout_logits.argmax(-1) == self.heldout_labels).float().mean().item())

    def before(self) -> RunResult:
        """The pretrained blocks, untrained (``trainable``: 0 in a frozen model)."""
        return self.measure(nn.ModuleList(last_blocks(self.model, self.n_blocks)))

    def run(self, targets: str | Sequence[str] | None, r: int | None = None) -> RunResult:
        """Train adapters of rank ``r`` on ``targets`` (or, with ``targets=None``,
        every weight of the blocks) for ``steps`` steps from seed ``seed``, and
        measure them, on ``threads`` threads. The notebook's own random stream
        and thread count are left alone."""
        with openmp_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            blocks = tail(self.model, self.n_blocks, targets, r, self.alpha)
            fit([p for p in blocks.parameters() if p.requires_grad],
                lambda: tail_logits(self.model, blocks, self.train, self.candidates),
                self.train_labels, steps=self.steps, lr=self.lr)
            return self.measure(blocks)
