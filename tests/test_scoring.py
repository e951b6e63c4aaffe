"""curvzo.scoring on tiny random models of four architectures.

The label-only and per-choice paths are checked against the ordinary full-vocabulary forward
(``full_logits_scores``): equivalences, not pinned numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from tiny import ARCHS, tiny_model, tokenizer

from curvzo import scoring
from curvzo.errors import ConfigError, CurvzoWarning, DataError
from curvzo.models import apply_peft
from curvzo.scoring import (
    answer_logits,
    classification_logits,
    classification_loss,
    encode,
    exact_match,
    full_logits_scores,
    generate_answers,
    lm_loss,
    majority_accuracy,
    objective_value,
    project,
    squad_f1,
)


@dataclass(frozen=True)
class Ex:
    """Stands in for curvzo.tasks.Example (scoring only reads these four fields)."""

    prompt: str
    choices: tuple[str, ...] = ()
    target: int = 0
    answers: tuple[str, ...] = ()


SENTIMENT = [
    Ex("I loved every minute of this movie. It was", (" terrible", " great"), 1),
    Ex("Boring, predictable and far too long! It was", (" terrible", " great"), 0),
    Ex("ok It was", (" terrible", " great"), 1),
]
COPA = [
    Ex(
        "The man broke his toe because",
        (" he dropped a hammer on his foot.", " he got a hole in his sock."),
        0,
    ),
    Ex("I tipped the bottle so", (" the liquid in the bottle froze.", " the liquid poured out."), 1),
    Ex(
        "The girl found a bug in her cereal. As a result,",
        (" she poured milk in the bowl.", " she lost her appetite."),
        1,
    ),
]
QA = [
    Ex("Question: What is the capital of France?\nAnswer:", target=-1, answers=("Paris", "paris, France")),
    Ex(
        "Context: The Broncos won Super Bowl 50 in a game played in California.\nQuestion: Who won?\nAnswer:",
        target=-1,
        answers=("Denver Broncos", "The Broncos"),
    ),
]
ATOL = 1e-5


@functools.cache
def model_for(arch: str) -> torch.nn.Module:
    return tiny_model(arch)


def log_softmax(scores: torch.Tensor) -> torch.Tensor:
    return scores.log_softmax(-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_token_label_only_equals_full_forward(arch: str) -> None:
    model, tok = model_for(arch), tokenizer()
    batch = encode(tok, SENTIMENT, max_length=64)
    per_choice = encode(tok, SENTIMENT, max_length=64, per_choice=True)
    assert batch.layout == "single" and per_choice.layout == "per_choice"
    assert batch.input_ids.shape[0] == len(SENTIMENT)  # one sequence per example

    logits = classification_logits(model, batch)
    reference = full_logits_scores(model, per_choice)
    torch.testing.assert_close(log_softmax(logits), log_softmax(reference), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        log_softmax(full_logits_scores(model, batch)), log_softmax(reference), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        classification_loss(model, batch), F.cross_entropy(reference, per_choice.targets), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_token_choices_equal_full_forward(arch: str) -> None:
    model = model_for(arch)
    batch = encode(tokenizer(), COPA, max_length=64)
    assert batch.layout == "per_choice" and batch.num_choices == 2
    scores = classification_logits(model, batch)
    reference = full_logits_scores(model, batch)
    assert scores.shape == (len(COPA), 2)
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        classification_loss(model, batch), F.cross_entropy(reference, batch.targets), atol=ATOL, rtol=0
    )


def test_label_only_path_never_projects_the_full_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for("llama")
    batch = encode(tokenizer(), SENTIMENT, max_length=64)
    head_rows: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].numel()))
    calls: list[tuple[int, ...] | None] = []

    def spy(head, hidden, token_ids=None):
        calls.append(None if token_ids is None else tuple(token_ids.shape))
        return project(head, hidden, token_ids)

    monkeypatch.setattr(scoring, "project", spy)
    try:
        classification_loss(model, batch)
    finally:
        handle.remove()
    assert head_rows == [0]  # transformers' own head call gets no positions
    assert calls == [(len(SENTIMENT), 2)]


def test_project_uses_the_head_bias() -> None:
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(3, 8)
    token_ids = torch.tensor([[4, 7], [0, 49], [7, 7]])
    expected = project(head, hidden).gather(1, token_ids)
    torch.testing.assert_close(project(head, hidden, token_ids), expected)


def test_boundary_merge_scores_the_merged_token() -> None:
    # "It was " + "great" tokenises to [It, was, " great"]: the trailing space merges into the choice.
    model, tok = model_for("llama"), tokenizer()
    merged = encode(tok, [Ex("It was ", ("great", "bad"), 0)], max_length=32)
    plain = encode(tok, [Ex("It was", (" great", " bad"), 0)], max_length=32)
    assert merged.layout == "single"
    assert torch.equal(merged.input_ids, plain.input_ids) and torch.equal(merged.choice_ids, plain.choice_ids)
    torch.testing.assert_close(classification_logits(model, merged), classification_logits(model, plain))


@pytest.mark.parametrize("per_choice", [False, True])
def test_left_truncation_keeps_the_answer_end(per_choice: bool) -> None:
    tok = tokenizer()
    prompt = " ".join(f"word{i}" for i in range(100)) + " The end. It was"
    choices = (" great", " really very bad")
    with pytest.warns(CurvzoWarning, match="truncated from the left"):
        batch = encode(tok, [Ex(prompt, choices, 0)], max_length=16, per_choice=per_choice)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert batch.layout == "per_choice"  # the second choice has several tokens
    for row, mask, choice in zip(batch.input_ids, batch.label_mask, choices):
        choice_ids = tok(choice, add_special_tokens=False)["input_ids"]
        assert len(row) == 16
        assert row[mask].tolist() == choice_ids
        assert row[: 16 - len(choice_ids)].tolist() == prompt_ids[-(16 - len(choice_ids)) :]


def test_single_layout_truncates_like_per_choice() -> None:
    model, tok = model_for("qwen2"), tokenizer()
    long = [Ex(" ".join(["filler"] * 80) + " It was", (" terrible", " great"), 1)]
    with pytest.warns(CurvzoWarning):
        single = encode(tok, long, max_length=20)
    with pytest.warns(CurvzoWarning):
        per_choice = encode(tok, long, max_length=20, per_choice=True)
    assert single.input_ids.shape == (1, 19)
    torch.testing.assert_close(
        log_softmax(classification_logits(model, single)),
        log_softmax(full_logits_scores(model, per_choice)),
        atol=ATOL,
        rtol=0,
    )


def test_max_length_beyond_model_context_is_a_data_error() -> None:
    batch = encode(tokenizer(), SENTIMENT, max_length=1000)  # tiny models have 128 positions
    with pytest.raises(DataError, match="exceeds the model's context of 128"):
        classification_loss(model_for("gpt2"), batch)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([Ex("Prompt", (" a long multi token choice here",), 0)], "no room for the prompt"),
        ([Ex("", (" great", " bad"), 0)], "empty prompt"),
        ([Ex("It was", (" great", ""), 0)], "empty after tokenisation"),
        ([Ex("It was", (" great", " bad"), 2)], "out of range"),
        (
            [Ex("It was", (" great", " bad"), 0), Ex("It was", (" a", " b", " c"), 0)],
            "same number of choices",
        ),
        ([Ex("It was", (" great", " bad"), 0), QA[0]], "mixes generation"),
        ([Ex("Q?", target=-1)], "no gold answers"),
        ([], "empty list"),
    ],
)
def test_malformed_examples_are_data_errors(examples: list[Ex], message: str) -> None:
    with pytest.raises(DataError, match=message):
        encode(tokenizer(), examples, max_length=4)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("examples", [SENTIMENT, COPA], ids=["single", "per_choice"])
def test_scores_do_not_depend_on_the_rest_of_the_batch(arch: str, examples: list[Ex]) -> None:
    model, tok = model_for(arch), tokenizer()
    long_neighbour = Ex(" ".join(["padding forces"] * 20) + examples[0].prompt, examples[0].choices, 0)
    alone = classification_logits(model, encode(tok, examples[2:], max_length=100))
    together = classification_logits(model, encode(tok, [long_neighbour, *examples[1:]], max_length=100))
    torch.testing.assert_close(
        together[1:],
        classification_logits(model, encode(tok, examples[1:], max_length=100)),
        atol=ATOL,
        rtol=0,
    )
    torch.testing.assert_close(together[2:], alone, atol=ATOL, rtol=0)


def test_gradients_flow_through_the_label_only_path_into_lora() -> None:
    model = apply_peft(tiny_model("llama"), "lora", lora_r=2)
    loss = classification_loss(model, encode(tokenizer(), SENTIMENT, max_length=64))
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prefix_tuning_label_only_equals_full_forward() -> None:
    model = apply_peft(tiny_model("llama"), "prefix", num_virtual_tokens=4)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    batch = encode(tokenizer(), SENTIMENT, max_length=64)
    reference = full_logits_scores(model, encode(tokenizer(), SENTIMENT, max_length=64, per_choice=True))
    torch.testing.assert_close(
        log_softmax(classification_logits(model, batch)), log_softmax(reference), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_loss_equals_full_forward_and_backpropagates(arch: str) -> None:
    model = tiny_model(arch)
    batch = encode(tokenizer(), QA, max_length=64)
    assert batch.layout == "lm"
    answer = tokenizer()(" Paris", add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0][batch.label_mask[0]].tolist() == answer  # the first gold, after a space

    loss = lm_loss(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.input_ids.masked_fill(~batch.label_mask, -100)
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, atol=ATOL, rtol=0)
    loss.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    with torch.no_grad():  # a Newton step's rows: the answer positions' vocabulary logits and their tokens
        rows, targets = answer_logits(model, batch)
        torch.testing.assert_close(rows, logits[:, :-1][labels[:, 1:] != -100], atol=ATOL, rtol=0)
        assert torch.equal(targets, labels[:, 1:][labels[:, 1:] != -100])
        torch.testing.assert_close(F.cross_entropy(rows.float(), targets), reference, atol=ATOL, rtol=0)


def _manual_greedy(model: torch.nn.Module, prompt: str, steps: int) -> str:
    """Unbatched greedy decoding from the ordinary full forward, the reference for generate_answers."""
    tok = tokenizer()
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
            if next_id == tok.eos_token_id:
                break
            ids.append(next_id)
            if "\n" in tok.decode(ids[len(prompt_ids) :]):
                break
    return tok.decode(ids[len(prompt_ids) :], skip_special_tokens=True).split("\n", 1)[0].strip()


@pytest.mark.parametrize("peft", ["none", "prefix"])
def test_generate_answers_is_batched_greedy_decoding(peft: str) -> None:
    model = apply_peft(tiny_model("llama"), peft, num_virtual_tokens=3)
    if peft == "prefix":
        with torch.no_grad():  # a prefix far from zero, so ignoring it would change the answers
            model.prompt_encoder.default.embedding.weight.normal_(
                0, 3, generator=torch.Generator().manual_seed(1)
            )
    answers = generate_answers(model, tokenizer(), QA, max_new_tokens=4)
    assert answers == [_manual_greedy(model, ex.prompt, 4) for ex in QA]
    assert all(answers)
    if peft == "prefix":
        with model.disable_adapter():
            assert generate_answers(model, tokenizer(), QA, max_new_tokens=4) != answers


def test_generation_stops_at_newline_and_eos(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tokenizer()
    paris, newline = (
        tok(" Paris", add_special_tokens=False)["input_ids"][0],
        tok("\n", add_special_tokens=False)["input_ids"][0],
    )
    script = {0: [paris, newline, paris], 1: [tok.eos_token_id, paris, paris]}
    steps: list[int] = []

    def scripted(head, hidden, token_ids=None):
        step = len(steps)
        steps.append(hidden.shape[0])
        logits = torch.zeros(hidden.shape[0], head.weight.shape[0])
        rows = [0, 1] if step == 0 else [0]  # row 1 stops at once on eos
        for row, example in enumerate(rows):
            logits[row, script[example][step]] = 1.0
        return logits

    monkeypatch.setattr(scoring, "project", scripted)
    assert generate_answers(model_for("llama"), tok, QA, max_new_tokens=10) == ["Paris", ""]
    assert steps == [2, 1]  # finished rows leave the batch; nothing runs after the newline


@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1"),
    [
        ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),
        ("the cat sat", ["cat sat on the mat"], 0.0, 2 * (1.0 * 0.5) / 1.5),
        ("Denver", ["Denver Broncos", "denver"], 1.0, 1.0),
        ("an apple, a pear", ["Pear apple"], 0.0, 1.0),
        ("", [""], 1.0, 1.0),
        ("something", [""], 0.0, 0.0),
        ("Paris.", ["London"], 0.0, 0.0),
    ],
)
def test_squad_metrics(prediction: str, golds: list[str], em: float, f1: float) -> None:
    assert exact_match(prediction, golds) == em
    assert squad_f1(prediction, golds) == pytest.approx(f1)


def test_metrics_need_gold_answers() -> None:
    with pytest.raises(DataError):
        squad_f1("x", [])


def test_objective_values() -> None:
    model, tok = model_for("gpt2"), tokenizer()
    classification = encode(tok, SENTIMENT, max_length=64)
    generation = encode(tok, QA, max_length=64)
    torch.testing.assert_close(
        objective_value(model, classification, "loss"), classification_loss(model, classification)
    )
    torch.testing.assert_close(objective_value(model, generation, "loss"), lm_loss(model, generation))
    assert objective_value(model, classification, "accuracy").item() == -scoring.accuracy(
        model, classification
    )
    answers = generate_answers(model, tok, QA, max_new_tokens=3, max_length=64)
    expected = -sum(squad_f1(a, ex.answers) for a, ex in zip(answers, QA)) / len(QA)
    assert objective_value(model, generation, "f1", max_new_tokens=3).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kind", "batch_of", "message"),
    [
        ("f1", "classification", "f1 objective needs"),
        ("accuracy", "generation", "needs a single or per_choice"),
        ("perplexity", "classification", "Invalid objective"),
    ],
)
def test_objective_misuse_is_a_config_error(kind: str, batch_of: str, message: str) -> None:
    examples = SENTIMENT if batch_of == "classification" else QA
    with pytest.raises(ConfigError, match=message):
        objective_value(model_for("gpt2"), encode(tokenizer(), examples, max_length=64), kind)


def test_batch_to_moves_every_tensor() -> None:
    batch = encode(tokenizer(), SENTIMENT, max_length=64).to("cpu")
    assert batch.num_examples == 3 and batch.num_choices == 2 and batch.choice_ids is not None


def test_majority_accuracy_answers_the_train_sets_most_frequent_gold_choice() -> None:
    train = [Ex("a", ("no", "yes"), 1), Ex("b", ("no", "yes"), 1), Ex("c", ("no", "yes"), 0)]
    evaluated = [Ex("d", ("no", "yes"), 0), Ex("e", ("no", "yes"), 1), Ex("f", ("no", "yes"), 1), Ex("g", ("no", "yes"), 1)]
    assert majority_accuracy(train, evaluated) == 0.75
    tied = [Ex("a", ("no", "yes"), 1), Ex("b", ("no", "yes"), 0)]
    assert majority_accuracy(tied, evaluated) == 0.25  # a tie goes to the first choice
    generation = [Ex("q", answers=("x",), target=-1)]
    assert majority_accuracy(generation, generation) is None and majority_accuracy(train, []) is None
