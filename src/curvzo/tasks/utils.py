"""Prompt code a template string cannot express, referenced from task YAML as ``!function utils.<name>``.

Each function reproduces one template class of MeZO (princeton-nlp/MeZO,
``large_models/templates.py``) character for character, named in its docstring, so results
stay comparable with the paper. Functions index documents directly: a missing field raises
KeyError, which :meth:`TaskConfig.render` turns into a DataError naming that field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from curvzo.errors import DataError

__all__ = ["boolq_text", "copa_choices", "copa_text", "drop_text", "sentiment_text", "squad_text", "wsc_text"]

Doc = Mapping[str, Any]

# CopaTemplate.effect_conj / cause_conj, without their trailing space: MeZO strips the prompt
# (`encode(...).strip(' ')`), so that space ends up in front of each choice instead.
_COPA_CONNECTORS = {"effect": " so", "cause": " because"}


def sentiment_text(doc: Doc) -> str:
    """SST2Template.encode (SST-2 and MR): MeZO strips the sentence, which drops GLUE's trailing space."""
    return f"{doc['sentence'].strip()} It was"


def boolq_text(doc: Doc) -> str:
    """BoolQTemplateV3.encode, MeZO's BoolQ default: question capitalised, "?" added, then a newline."""
    question = doc["question"]
    if not question.endswith("?"):
        question += "?"
    question = question[:1].upper() + question[1:]
    return f"{doc['passage']} {question}\n"


def wsc_text(doc: Doc) -> str:
    """WSCTemplate.encode: the pronoun (span2) is lower-cased, the candidate (span1) is not."""
    return (
        f"{doc['text']}\nIn the previous sentence, does the pronoun \"{doc['span2_text'].lower()}\" "
        f"refer to {doc['span1_text']}? Yes or No?\n"
    )


def copa_text(doc: Doc) -> str:
    """CopaTemplate.get_prompt: premise without its final "." plus " so" (effect) or " because" (cause)."""
    premise = doc["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    question = doc["question"]
    if question not in _COPA_CONNECTORS:
        raise DataError(f"COPA `question` must be 'cause' or 'effect', got {question!r}")
    return premise + _COPA_CONNECTORS[question]


def copa_choices(doc: Doc) -> tuple[str, str]:
    """CopaTemplate.verbalize with capitalization="correct": each choice continues the premise."""
    return (" " + _copa_case(doc["choice1"]), " " + _copa_case(doc["choice2"]))


def _copa_case(choice: str) -> str:
    # MeZO lower-cases the first word unless it is "I", splitting on single spaces only.
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def squad_text(doc: Doc) -> str:
    """SQuADv2Template.encode (used for SQuAD): only the question is stripped."""
    return f"Title: {doc['title']}\nContext: {doc['context']}\nQuestion: {doc['question'].strip()}\nAnswer:"


def drop_text(doc: Doc) -> str:
    """DROPTemplate.encode: MeZO maps `passage` to `context`; only the question is stripped."""
    return f"Passage: {doc['passage']}\nQuestion: {doc['question'].strip()}\nAnswer:"
