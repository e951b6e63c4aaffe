"""Forward-only losses and metrics for causal LMs on rendered task examples.

Classification follows MeZO's "train as classification": each choice is a continuation of the
prompt, its score is the summed log-likelihood of its tokens, and the loss is the cross-entropy of
the gold choice over the scores. When every choice is a single token (``" great"`` /
``" terrible"``) the full-vocabulary normaliser is the same for all choices and cancels, so the
loss only needs the LM-head rows of the candidate tokens at the answer position: one sequence per
example and no vocabulary-sized logits anywhere, which saves a quarter of a small model's forward.

Three batch layouts come out of :func:`encode`:

* ``"single"``: one row per example holding the prompt; ``choice_ids`` are the candidate tokens.
* ``"per_choice"``: one row per (example, choice) holding prompt + choice; ``label_mask`` marks
  the choice tokens, scored with a full-vocabulary log-softmax at those positions only.
* ``"lm"``: generation tasks; one row per example holding prompt + first gold answer.

All LM-head arithmetic goes through :func:`project`, the one place a perturbation of the head
needs to hook. Functions here neither enable nor disable autograd (except greedy generation,
which is not differentiable): wrap ZO evaluations in ``torch.no_grad()``, and backpropagate through
:func:`classification_loss` or :func:`lm_loss` for a first-order baseline.

Example::

    batch = encode(tokenizer, examples, max_length=256)
    with torch.no_grad():
        loss = classification_loss(model, batch)
"""

from __future__ import annotations

import re
import string
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from curvzo.errors import ConfigError, CurvzoWarning, DataError, ModelError
from curvzo.optim import read_rows
from curvzo.optim._validate import is_int

__all__ = [
    "check_fits",
    "ExampleLike",
    "Batch",
    "encode",
    "project",
    "lm_head",
    "classification_logits",
    "answer_logits",
    "classification_loss",
    "accuracy",
    "majority_accuracy",
    "full_logits_scores",
    "lm_loss",
    "generate_answers",
    "exact_match",
    "squad_f1",
    "objective_value",
]

Layout = Literal["single", "per_choice", "lm"]
Objective = Literal["loss", "accuracy", "f1"]

# MeZO's generation length for SQuAD/DROP; greedy decoding stops earlier at a newline or eos.
DEFAULT_MAX_NEW_TOKENS = 50


class ExampleLike(Protocol):
    """What scoring reads from a rendered example (``curvzo.tasks.Example`` has these fields).

    ``choices`` are continuations exactly as the LM sees them; generation examples have no
    choices, ``target == -1`` and the gold ``answers``.
    """

    @property
    def prompt(self) -> str: ...

    @property
    def choices(self) -> tuple[str, ...]: ...

    @property
    def target(self) -> int: ...

    @property
    def answers(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, eq=False)
class Batch:
    """Right-padded token tensors for one forward pass, plus the text that metrics need.

    Attributes:
        input_ids: ``[rows, length]`` token ids; rows are examples (``"single"``, ``"lm"``) or
            example-major (example, choice) pairs (``"per_choice"``).
        attention_mask: ``[rows, length]``, 1 on real tokens, 0 on right padding.
        targets: ``[examples]`` gold choice index, -1 for generation examples.
        label_mask: ``[rows, length]`` bool, True on the continuation tokens whose
            log-likelihood is scored (all False in the ``"single"`` layout).
        choice_ids: ``[examples, choices]`` candidate tokens in the ``"single"`` layout, else None.
        layout: ``"single"``, ``"per_choice"`` or ``"lm"`` (see the module docstring).
        max_length: the limit the rows were truncated to; checked against the model's context.
        examples: the examples encoded, for text metrics such as F1.
        tokenizer: the tokenizer used, to generate and decode answers for those metrics.
    """

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    label_mask: Tensor
    choice_ids: Tensor | None
    layout: Layout
    max_length: int
    examples: tuple[ExampleLike, ...]
    tokenizer: PreTrainedTokenizerBase

    @property
    def num_examples(self) -> int:
        return self.targets.shape[0]

    @property
    def num_choices(self) -> int:
        """Choices per example (0 for generation batches)."""
        if self.layout == "lm":
            return 0
        if self.choice_ids is not None:
            return self.choice_ids.shape[1]
        return self.input_ids.shape[0] // self.num_examples

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device``."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            targets=self.targets.to(device),
            label_mask=self.label_mask.to(device),
            choice_ids=None if self.choice_ids is None else self.choice_ids.to(device),
        )


# --------------------------------------------------------------------------------------------
# Encoding


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _leading_specials(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before any text (BOS for Llama-2 or OPT; none for SmolLM2).

    Text is tokenised without special tokens and these are prepended by hand, so that trailing
    specials (an EOS some tokenizers append) never land between a prompt and its continuation.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _split(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """Split ``tokens(prompt + continuation)`` into context and continuation tokens.

    The continuation starts where the tokens stop agreeing with ``tokens(prompt)``. When the
    tokenizer merges across the boundary (a prompt ending in a space before ``"great"`` becomes
    ``" great"``), the merged token counts as continuation: the context keeps only tokens the
    prompt alone also produces.
    """
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    return full_ids[:common], full_ids[common:]


class _Fitter:
    """Builds ``leading specials + context + continuation`` rows of at most ``max_length`` tokens.

    Contexts are cut from the left, so the end of the prompt and the whole continuation survive.
    """

    def __init__(self, leading: list[int], max_length: int) -> None:
        if max_length < 2:
            raise DataError(f"Invalid max_length: {max_length}; must be at least 2")
        self.leading = leading
        self.max_length = max_length
        self.truncated = 0

    def row(self, context: list[int], continuation: list[int]) -> list[int]:
        if not continuation:
            raise DataError("An answer or choice is empty after tokenisation; nothing to score")
        room = self.max_length - len(self.leading) - len(continuation)
        if room < 1:
            raise DataError(
                f"A continuation of {len(continuation)} tokens leaves no room for the prompt "
                f"within max_length={self.max_length}"
            )
        if not self.leading and not context:
            raise DataError("An example has an empty prompt: no token precedes the continuation")
        if len(context) > room:
            self.truncated += 1
            context = context[-room:]
        return self.leading + context + continuation

    def warn(self, *, stacklevel: int) -> None:
        # One fixed text per max_length, so Python's warning registry shows it once per call site
        # instead of once per batch (a count in the text would make every batch's warning new).
        if self.truncated:
            warnings.warn(
                f"sequences longer than max_length={self.max_length} are truncated from the left "
                "(raise max_length to keep whole prompts)",
                CurvzoWarning,
                stacklevel=stacklevel + 1,
            )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # padded positions are masked out; any id works


def _pad_right(
    rows: list[list[int]], pad_id: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def _label_mask(rows: list[list[int]], continuation_lengths: list[int], width: int) -> Tensor:
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, continuation_lengths)):
        mask[i, len(row) - n : len(row)] = True
    return mask


def _answer_continuation(prompt: str, answer: str) -> str:
    """The gold answer as the LM should continue the prompt: after one space unless one is there.

    Generation tasks store bare answers (``"Denver Broncos"``) for F1; a prompt ending in
    ``"Answer:"`` is continued by ``" Denver Broncos"``, one ending in a newline by the bare answer.
    """
    if not prompt or prompt[-1].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def _check_examples(examples: Sequence[ExampleLike]) -> Literal["classification", "generation"]:
    if not examples:
        raise DataError("Cannot encode an empty list of examples")
    generation = [ex.target == -1 for ex in examples]
    if any(generation) and not all(generation):
        raise DataError("A batch mixes generation examples (target -1) with classification examples")
    if all(generation):
        if any(not ex.answers for ex in examples):
            raise DataError("A generation example (target -1) has no gold answers")
        return "generation"
    num_choices = {len(ex.choices) for ex in examples}
    if len(num_choices) != 1:
        raise DataError(
            f"Examples in one batch must have the same number of choices; got {sorted(num_choices)}"
        )
    for ex in examples:
        if not 0 <= ex.target < len(ex.choices):
            raise DataError(f"Target {ex.target} is out of range for {len(ex.choices)} choices")
    return "classification"


def encode(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    *,
    max_length: int,
    per_choice: bool = False,
) -> Batch:
    """Tokenise rendered examples into a right-padded :class:`Batch`.

    Each choice is tokenised together with its prompt (``prompt + choice`` as one string), so a
    multi-token verbalizer and any merge at the boundary come out as the LM would see them. When
    every choice of every example is one token after the same context, the batch uses the cheap
    ``"single"`` layout; otherwise ``"per_choice"``. Prompts are truncated from the left to fit
    ``max_length`` (with a :class:`~curvzo.errors.CurvzoWarning`), keeping the answer end.

    Args:
        tokenizer: the model's tokenizer.
        examples: classification examples (same number of choices each) or generation examples
            (``target == -1``), not mixed.
        max_length (int): the most tokens in a row, continuation included.
        per_choice (bool): use the ``"per_choice"`` layout even for single-token choices, which
            scores with full-vocabulary log-likelihoods (default: False).

    Raises:
        DataError: mixed or malformed examples, an empty prompt or choice, or a continuation that
            does not fit ``max_length``.
    """
    kind = _check_examples(examples)
    fitter = _Fitter(_leading_specials(tokenizer), max_length)
    if kind == "generation":
        continuations = [_answer_continuation(ex.prompt, ex.answers[0]) for ex in examples]
        splits = _splits(tokenizer, [ex.prompt for ex in examples], continuations)
        return _build(tokenizer, examples, fitter, splits, "lm", None)
    prompts = [ex.prompt for ex in examples for _ in ex.choices]
    splits = _splits(tokenizer, prompts, [choice for ex in examples for choice in ex.choices])
    num_choices = len(examples[0].choices)
    grouped = [splits[i : i + num_choices] for i in range(0, len(splits), num_choices)]
    if not per_choice and all(_single_token(group) for group in grouped):
        choice_ids = torch.tensor([[cont[0] for _, cont in group] for group in grouped], dtype=torch.long)
        return _build(tokenizer, examples, fitter, [group[0] for group in grouped], "single", choice_ids)
    return _build(tokenizer, examples, fitter, splits, "per_choice", None)


def _splits(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], continuations: list[str]
) -> list[tuple[list[int], list[int]]]:
    prompt_ids = _token_ids(tokenizer, prompts)
    full_ids = _token_ids(tokenizer, [p + c for p, c in zip(prompts, continuations)])
    return [_split(p, f) for p, f in zip(prompt_ids, full_ids)]


def _single_token(group: list[tuple[list[int], list[int]]]) -> bool:
    """All choices are one token after one shared context, so one sequence scores them all."""
    context = group[0][0]
    return all(len(cont) == 1 and ctx == context for ctx, cont in group)


def _build(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    fitter: _Fitter,
    splits: list[tuple[list[int], list[int]]],
    layout: Layout,
    choice_ids: Tensor | None,
) -> Batch:
    if layout == "single":
        # Fit as if the choice token were appended, so truncation matches the per-choice layout;
        # the row itself stops at the prompt, whose last hidden state predicts the choice.
        rows = [fitter.row(context, [0])[:-1] for context, _ in splits]
        lengths = [0] * len(rows)
    else:
        rows = [fitter.row(context, continuation) for context, continuation in splits]
        lengths = [len(continuation) for _, continuation in splits]
    fitter.warn(stacklevel=3)  # report at encode's caller
    input_ids, attention_mask = _pad_right(rows, _pad_id(tokenizer))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        targets=torch.tensor([ex.target for ex in examples], dtype=torch.long),
        label_mask=_label_mask(rows, lengths, input_ids.shape[1]),
        choice_ids=choice_ids,
        layout=layout,
        max_length=fitter.max_length,
        examples=tuple(examples),
        tokenizer=tokenizer,
    )


# --------------------------------------------------------------------------------------------
# Forward passes


def project(head: nn.Linear, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
    """Logits from final hidden states: the only place the LM head is applied.

    Args:
        head: the model's output projection (``lm_head``), weight ``[vocab, hidden]``.
        hidden: ``[rows, hidden]`` final hidden states (after the last norm).
        token_ids: ``[rows, k]`` candidate tokens per row; None for the full vocabulary.

    Returns:
        ``[rows, vocab]`` logits, or ``[rows, k]`` logits of the candidates only (computed from
        those ``k`` rows of the weight, never the whole vocabulary).

    The head is called as a module, or its rows are read with :func:`curvzo.optim.read_rows`, so
    that inside a ZO step both see the step's perturbation (only the rows read are perturbed).
    """
    if token_ids is None:
        return head(hidden)
    logits = torch.einsum("nh,nkh->nk", hidden, read_rows(head.weight, token_ids))
    return logits if head.bias is None else logits + read_rows(head.bias, token_ids)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection of a causal LM, also through a PEFT wrapper."""
    head = _causal_lm(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ModelError(
            f"Scoring needs the LM head to be a plain nn.Linear, got {type(head).__name__} "
            "(do not adapt lm_head with PEFT)"
        )
    return head


# The LM head is given no position to project, so transformers' own forward computes no logits.
_NO_POSITIONS = torch.empty(0, dtype=torch.long)


def _final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[rows, length, hidden]`` hidden states that the LM head would read.

    The model's own forward runs (so PEFT prefix tuning still injects its prefix) while a hook on
    the decoder stack captures its output (``get_decoder``: the module the causal LM feeds to its
    head, e.g. ``LlamaModel``, or ``OPTDecoder`` inside ``OPTModel``).
    """
    captured: list[Tensor] = []
    body = _causal_lm(model).get_decoder()
    handle = body.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=_NO_POSITIONS.to(input_ids.device),
            use_cache=False,
        )
    finally:
        handle.remove()
    return captured[-1]


def _context_length(model: nn.Module) -> int | None:
    return getattr(_causal_lm(model).config, "max_position_embeddings", None)


def check_fits(model: nn.Module, length: int) -> None:
    """Refuse sequences longer than the model's positions (they would index past its embeddings)."""
    context = _context_length(model)
    if context is not None and length > context:
        raise DataError(f"max_length={length} exceeds the model's context of {context} positions")


def _require(batch: Batch, layouts: tuple[Layout, ...], what: str) -> None:
    if batch.layout not in layouts:
        raise ConfigError(f"{what} needs a {' or '.join(layouts)} batch, got a {batch.layout!r} batch")


def _continuation_logprobs(head: nn.Linear, hidden: Tensor, input_ids: Tensor, label_mask: Tensor) -> Tensor:
    """``[rows]`` summed log-likelihood of each row's labelled tokens, and their count.

    The full-vocabulary softmax runs only at the positions that predict a labelled token.
    """
    predicts = label_mask[:, 1:]
    logprobs = project(head, hidden[:, :-1][predicts]).float().log_softmax(-1)
    token_logprobs = logprobs.gather(1, input_ids[:, 1:][predicts].unsqueeze(1)).squeeze(1)
    rows = predicts.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=token_logprobs.dtype, device=input_ids.device).index_add(
        0, rows, token_logprobs
    )


def classification_logits(model: nn.Module, batch: Batch) -> Tensor:
    """``[examples, choices]`` scores whose softmax over choices is the model's choice distribution.

    In the ``"single"`` layout these are the candidate tokens' logits at the answer position (the
    softmax restricted to the verbalizer, as MeZO does); in ``"per_choice"`` they are summed
    log-likelihoods of the choice tokens. Both give the same softmax over choices.
    """
    _require(batch, ("single", "per_choice"), "classification_logits")
    check_fits(model, batch.max_length)
    head = lm_head(model)
    hidden = _final_hidden(model, batch.input_ids, batch.attention_mask)
    if batch.choice_ids is not None:
        last = batch.attention_mask.sum(1) - 1
        answer_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return project(head, answer_hidden, batch.choice_ids).float()
    scores = _continuation_logprobs(head, hidden, batch.input_ids, batch.label_mask)
    return scores.view(batch.num_examples, batch.num_choices)


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of the gold choice over :func:`classification_logits`."""
    return F.cross_entropy(classification_logits(model, batch), batch.targets)


def accuracy(model: nn.Module, batch: Batch) -> float:
    """Fraction of examples whose highest-scoring choice is the gold one (ties go to the first)."""
    with torch.no_grad():
        predicted = classification_logits(model, batch).argmax(-1)
    return (predicted == batch.targets).float().mean().item()


def majority_accuracy(train: Sequence[ExampleLike], evaluated: Sequence[ExampleLike]) -> float | None:
    """Accuracy on ``evaluated`` of always answering the choice most often gold in ``train``
    (ties to the first choice); None for generation examples or an empty set.

    It is what a model reaches by learning the label prior alone, the floor below which a trained
    classifier has learned nothing about the inputs (BoolQ's "yes" is 62% of its validation split).
    """
    targets = [ex.target for ex in train if ex.choices]
    if not targets or not evaluated or not all(ex.choices for ex in evaluated):
        return None
    counts = Counter(targets)
    constant = min(counts, key=lambda target: (-counts[target], target))
    return sum(ex.target == constant for ex in evaluated) / len(evaluated)


def full_logits_scores(model: nn.Module, batch: Batch) -> Tensor:
    """Reference ``[examples, choices]`` log-likelihoods from the ordinary full forward.

    Computes vocabulary logits at every position with ``model(...)`` and reads the choice tokens'
    log-probabilities from them; slow, for checking :func:`classification_logits`.
    """
    _require(batch, ("single", "per_choice"), "full_logits_scores")
    logprobs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logprobs = logprobs.float().log_softmax(-1)
    if batch.choice_ids is not None:
        last = batch.attention_mask.sum(1) - 1
        at_answer = logprobs[torch.arange(logprobs.shape[0], device=logprobs.device), last]
        return at_answer.gather(1, batch.choice_ids)
    token_logprobs = logprobs[:, :-1].gather(2, batch.input_ids[:, 1:].unsqueeze(2)).squeeze(2)
    scores = (token_logprobs * batch.label_mask[:, 1:]).sum(1)
    return scores.view(batch.num_examples, batch.num_choices)


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Teacher-forced cross-entropy on the gold answer tokens, averaged over all of them."""
    _require(batch, ("lm",), "lm_loss")
    check_fits(model, batch.max_length)
    hidden = _final_hidden(model, batch.input_ids, batch.attention_mask)
    total = _continuation_logprobs(lm_head(model), hidden, batch.input_ids, batch.label_mask).sum()
    return -total / batch.label_mask.sum()


def answer_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """``[tokens, vocab]`` logits at the positions that predict a gold answer token, and those tokens.

    Their mean cross-entropy is :func:`lm_loss`; a Newton step measures its curvature from them
    (the full-vocabulary projection runs only at the answer positions, as in :func:`lm_loss`).
    """
    _require(batch, ("lm",), "answer_logits")
    check_fits(model, batch.max_length)
    hidden = _final_hidden(model, batch.input_ids, batch.attention_mask)
    predicts = batch.label_mask[:, 1:]
    return project(lm_head(model), hidden[:, :-1][predicts]), batch.input_ids[:, 1:][predicts]


# --------------------------------------------------------------------------------------------
# Generation and text metrics


def _answer_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True).split("\n", 1)[0].strip()


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ExampleLike],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_length: int | None = None,
) -> list[str]:
    """Greedy answers to the examples' prompts, cut at the first newline or eos.

    Each step re-runs the right-padded forward used for scoring and projects only the last real
    position through :func:`project`, with no KV cache. That keeps generation consistent with
    scoring (same padding, positions and head) and correct for PEFT prefix tuning, whose prefix
    ``model.generate`` ignores with transformers 5 / peft 0.21; finished rows leave the batch.

    Args:
        max_new_tokens (int): most tokens generated per answer (default: 50, as MeZO).
        max_length (int, optional): prompts are cut from the left to ``max_length -
            max_new_tokens`` tokens (default: no limit beyond the model's context).
    """
    if not is_int(max_new_tokens, minimum=1):
        raise ConfigError(f"Invalid max_new_tokens: {max_new_tokens}; must be at least 1")
    limit = max_length if max_length is not None else _context_length(model)
    if limit is not None:
        check_fits(model, limit)
    fitter = _Fitter(_leading_specials(tokenizer), limit if limit is not None else sys.maxsize)
    # Reserve room for the answer the way encode reserves it for a continuation, then drop it.
    reserved = [0] * max_new_tokens
    prompts = [
        fitter.row(ids, reserved)[:-max_new_tokens]
        for ids in _token_ids(tokenizer, [ex.prompt for ex in examples])
    ]
    fitter.warn(stacklevel=2)
    return _greedy(model, tokenizer, lm_head(model), prompts, max_new_tokens)


def _greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    head: nn.Linear,
    prompts: list[list[int]],
    max_new_tokens: int,
) -> list[str]:
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if not active:
                break
            input_ids, attention_mask = _pad_right(
                [prompts[i] + generated[i] for i in active], _pad_id(tokenizer), head.weight.device
            )
            hidden = _final_hidden(model, input_ids, attention_mask)
            last = hidden[torch.arange(len(active), device=hidden.device), attention_mask.sum(1) - 1]
            next_ids = project(head, last).argmax(-1).tolist()
            still_active = []
            for i, token in zip(active, next_ids):
                if token == tokenizer.eos_token_id:
                    continue
                generated[i].append(token)
                if "\n" not in tokenizer.decode(generated[i]):
                    still_active.append(i)
            active = still_active
    return [_answer_text(tokenizer, ids) for ids in generated]


def _normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _check_golds(golds: Sequence[str]) -> None:
    if not golds:
        raise DataError("No gold answers to compare a prediction with")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    _check_golds(golds)
    return float(any(_normalize_answer(prediction) == _normalize_answer(gold) for gold in golds))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens = _normalize_answer(prediction).split()
    gold_tokens = _normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD v2 convention: two empty answers agree, one empty answer scores 0.
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token-overlap F1 of the prediction against its best-matching gold answer."""
    _check_golds(golds)
    return max(_token_f1(prediction, gold) for gold in golds)


def objective_value(
    model: nn.Module,
    batch: Batch,
    kind: Objective,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Tensor:
    """A 0-dim tensor to minimise: the loss, or a non-differentiable metric with its sign flipped.

    ``"loss"`` is :func:`classification_loss` (or :func:`lm_loss` on a generation batch).
    ``"accuracy"`` is minus the accuracy and ``"f1"`` minus the mean SQuAD F1 of greedy answers,
    MeZO's sign convention for non-differentiable objectives (a ZO step only uses differences, so
    ``-metric`` and ``1 - metric`` give the same update).
    """
    if kind == "loss":
        return lm_loss(model, batch) if batch.layout == "lm" else classification_loss(model, batch)
    if kind == "accuracy":
        return torch.tensor(-accuracy(model, batch))
    if kind == "f1":
        _require(batch, ("lm",), "the f1 objective")
        answers = generate_answers(
            model, batch.tokenizer, batch.examples, max_new_tokens=max_new_tokens, max_length=batch.max_length
        )
        f1 = [squad_f1(answer, ex.answers) for answer, ex in zip(answers, batch.examples)]
        return torch.tensor(-sum(f1) / len(f1))
    raise ConfigError(f"Invalid objective: {kind!r}; expected one of loss, accuracy, f1")
