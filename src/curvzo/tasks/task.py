"""The task schema: one dataclass that turns a raw document into (prompt, choices, target).

A task is data, as in lm-evaluation-harness: a YAML file fills a :class:`TaskConfig`, whose three
``doc_to_*`` fields are a template, a field name, a list, or a ``!function`` reference to
``curvzo/tasks/utils.py`` for the few prompts a template cannot express. What a source needs
beyond the common layout is data too: a ``holdout`` for a folder without an official test split,
and ``expand`` / ``adapter`` / ``fetch`` functions from ``curvzo/tasks/sources.py``. Rendering is strict: a
template field missing from a document raises :class:`~curvzo.errors.DataError` naming the field
instead of producing a silently wrong prompt.
"""

from __future__ import annotations

import difflib
import importlib
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Literal, get_args

import yaml

from curvzo.errors import ConfigError, DataError
from curvzo.optim._validate import is_int, is_real

__all__ = [
    "Example",
    "Holdout",
    "METRICS",
    "OUTPUT_TYPES",
    "TaskConfig",
    "TaskFunction",
    "TaskLoader",
    "load_task_yaml",
]

OutputType = Literal["multiple_choice", "multiple_choice_cont", "generate_until"]
Metric = Literal["accuracy", "f1"]
OUTPUT_TYPES: tuple[str, ...] = get_args(OutputType)
METRICS: tuple[str, ...] = get_args(Metric)
FUNCTION_TAG = "!function"
#: ``!function <module>.<name>`` with one of these modules refers to ``curvzo.tasks.<module>``.
_TASK_MODULES = ("utils", "sources")
_DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv")

Doc = Mapping[str, Any]


@dataclass(frozen=True)
class Example:
    """One rendered document, ready for tokenisation.

    ``choices`` are continuation strings exactly as the LM sees them after ``prompt`` (leading
    space included when the template puts one), so scoring never has to guess a delimiter;
    ``target`` indexes them. Generation tasks have no choices, ``target == -1`` and their gold
    ``answers`` instead.
    """

    prompt: str
    choices: tuple[str, ...] = ()
    target: int = -1
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskFunction:
    """A callable named by ``!function <ref>``; it keeps ``ref`` so ``to_dict()`` round-trips.

    ``utils.name`` and ``sources.name`` refer to :mod:`curvzo.tasks.utils` and
    :mod:`curvzo.tasks.sources`; any other dotted path (``pkg.mod.name``) is imported, so a
    user's own task can bring its own code.
    """

    ref: str
    fn: Callable[..., Any] = field(repr=False, compare=False)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    @classmethod
    def resolve(cls, ref: str) -> TaskFunction:
        """Look ``ref`` up now, so a typo fails when the task is defined, not mid-training."""
        ref = ref.strip()
        module_name, _, attr = ref.rpartition(".")
        if module_name in _TASK_MODULES:
            module_name = f"curvzo.tasks.{module_name}"
        if not module_name or not attr:
            raise ConfigError(f"`{FUNCTION_TAG} {ref}`: expected `utils.<name>`, `sources.<name>` or `package.module.<name>`")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"`{FUNCTION_TAG} {ref}`: cannot import {module_name} ({exc})") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            hint = difflib.get_close_matches(attr, public, n=1)
            suffix = f" Did you mean: {hint[0]}?" if hint else ""
            raise ConfigError(f"`{FUNCTION_TAG} {ref}`: {module_name} has no function {attr!r}.{suffix}")
        return cls(ref=ref, fn=fn)


def _as_spec(value: Any) -> Any:
    """Turn the string form ``"!function utils.x"`` (JSON configs, ``to_dict()``) into a TaskFunction."""
    if isinstance(value, str) and value.startswith(FUNCTION_TAG + " "):
        return TaskFunction.resolve(value[len(FUNCTION_TAG) :])
    return value


@dataclass(frozen=True)
class Holdout:
    """A local folder with one file and no official split: whole groups go to the test pool.

    Grouping (by article, passage or sentence) keeps any text out of both pools; the share is
    drawn with a fixed seed, so no seed's train pool overlaps another seed's test pool.
    """

    file: str
    group_by: str
    test_fraction: float

    @classmethod
    def parse(cls, task: str, value: Any) -> Holdout:
        keys = {"file", "group_by", "test_fraction"}
        if isinstance(value, Holdout):
            return value
        if not isinstance(value, Mapping) or set(value) != keys:
            raise ConfigError(f"task `{task}`: `holdout` must be {{file, group_by, test_fraction}}, got {value!r}")
        if not isinstance(value["file"], str) or not value["file"].endswith(".jsonl"):
            raise ConfigError(f"task `{task}`: `holdout.file` must name a .jsonl file, got {value['file']!r}")
        if not isinstance(value["group_by"], str) or not value["group_by"]:
            raise ConfigError(f"task `{task}`: `holdout.group_by` must be a field name, got {value['group_by']!r}")
        fraction = value["test_fraction"]
        if not (is_real(fraction, lo=0.0, hi=1.0, hi_open=True) and fraction > 0):
            raise ConfigError(f"task `{task}`: `holdout.test_fraction` must be in (0, 1), got {fraction!r}")
        return cls(value["file"], value["group_by"], float(fraction))


def _template_fields(template: str) -> list[str]:
    """The root field names a ``str.format`` template uses (``{a.b}`` and ``{a[0]}`` give ``a``)."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        root = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError("templates use named fields such as {sentence}, not positional {} or {0}")
        names.append(root)
    return names


def _field_names(doc: Doc) -> str:
    return ", ".join(sorted(map(str, doc))) or "none"


@dataclass(frozen=True)
class TaskConfig:
    r"""Everything that defines a task: where its data lives and how a document becomes a prompt.

    Keys of the task YAML files are these field names, plus ``metadata: {version: N}``. Example::

        get_task("rte").render({"premise": "It rained.", "hypothesis": "It was wet.", "label": 0})
        # Example(prompt='It rained.\nDoes this mean that "It was wet." is true? Yes or No?\n',
        #         choices=('Yes', 'No'), target=0, answers=())
    """

    # --- identity -------------------------------------------------------------------------
    name: str = field(metadata={"help": "Registry name; the HF dataset config name for built-ins (`sst2`)."})
    # --- prompt ---------------------------------------------------------------------------
    doc_to_text: str | TaskFunction = field(
        metadata={"help": "Prompt: a str.format template with {field} placeholders, or `!function`."}
    )
    doc_to_target: str | TaskFunction = field(
        metadata={
            "help": "Field holding the label index (dotted path allowed, e.g. `answers.text` for the "
            "gold answers of a generation task), or `!function`."
        }
    )
    output_type: OutputType = field(
        default="multiple_choice",
        metadata={
            "help": "`multiple_choice`: one prompt, each choice scored at the answer position; "
            "`multiple_choice_cont`: each choice is a continuation scored by summed log-likelihood "
            "(COPA); `generate_until`: free generation scored against `answers` (SQuAD, DROP)."
        },
    )
    doc_to_choice: tuple[str, ...] | str | TaskFunction | None = field(
        default=None,
        metadata={
            "help": "Continuations in label order, leading space included as the LM sees it; or a "
            "field holding them; or `!function`. None for `generate_until`."
        },
    )
    metric: Metric = field(default="accuracy", metadata={"help": "`accuracy` (classification) or `f1` (generation)."})
    # --- data -----------------------------------------------------------------------------
    hub: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Arguments of `datasets.load_dataset` (path, config); None: no hub source."},
    )
    local_dir: str = field(default="", metadata={"help": "Folder under a local data dir; empty: `name`."})
    train_split: str = field(default="train", metadata={"help": "Split the train and dev sets are drawn from."})
    test_split: str = field(default="validation", metadata={"help": "Split the test set is drawn from."})
    data_files: dict[str, str] | None = field(
        default=None,
        metadata={"help": "User task files, `{train: path, test: path}`, JSONL or CSV; overrides hub."},
    )
    holdout: Holdout | None = field(
        default=None,
        metadata={
            "help": "`{file, group_by, test_fraction}`: when the local folder has no `<train_split>.jsonl`, "
            "read `file` and hold out that fraction of its `group_by` values as the test pool."
        },
    )
    expand: TaskFunction | None = field(
        default=None,
        metadata={"help": "`!function`: one row of a local JSONL file -> the list of documents it holds."},
    )
    adapter: TaskFunction | None = field(
        default=None, metadata={"help": "`!function`: one hub row -> the document the task reads."}
    )
    fetch: TaskFunction | None = field(
        default=None,
        metadata={
            "help": "`!function`: builds the local files when there is no hub source and no data dir; "
            "returns the path of the file it built, `<data dir>/<local_dir>/<file>`."
        },
    )
    # --- bookkeeping ----------------------------------------------------------------------
    version: int = field(
        default=1, metadata={"help": "Bumped whenever the prompt or scoring changes (`metadata.version`)."}
    )
    num_labels: int | None = field(
        init=False, metadata={"help": "Derived: len(doc_to_choice) when it is a fixed list, else None."}
    )

    def __post_init__(self) -> None:
        self._check_name()
        self._check_prompt()
        self._check_data()
        if not is_int(self.version, minimum=0):
            raise ConfigError(f"task `{self.name}`: `version` must be a non-negative integer, got {self.version!r}")
        choices = self.doc_to_choice
        object.__setattr__(self, "num_labels", len(choices) if isinstance(choices, tuple) else None)

    # --- validation (one concern each) -----------------------------------------------------
    def _check_name(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"`name` must be a non-empty word (letters, digits, _ . -), got {self.name!r}")

    def _check_prompt(self) -> None:
        if self.output_type not in OUTPUT_TYPES:
            raise ConfigError(
                f"task `{self.name}`: `output_type` must be one of {OUTPUT_TYPES}, got {self.output_type!r}"
            )
        expected_metric = "f1" if self.output_type == "generate_until" else "accuracy"
        if self.metric != expected_metric:
            raise ConfigError(
                f"task `{self.name}`: `metric` must be {expected_metric!r} for output_type "
                f"{self.output_type!r} (one of {METRICS}), got {self.metric!r}"
            )
        text = _as_spec(self.doc_to_text)
        if isinstance(text, str):
            try:
                _template_fields(text)
            except ValueError as exc:
                raise ConfigError(f"task `{self.name}`: `doc_to_text` is not a valid template: {exc}") from None
        elif not isinstance(text, TaskFunction):
            raise ConfigError(f"task `{self.name}`: `doc_to_text` must be a template string or `!function`")
        target = _as_spec(self.doc_to_target)
        if not isinstance(target, (str, TaskFunction)) or target == "":
            raise ConfigError(f"task `{self.name}`: `doc_to_target` must be a field name or `!function`")
        object.__setattr__(self, "doc_to_text", text)
        object.__setattr__(self, "doc_to_target", target)
        object.__setattr__(self, "doc_to_choice", self._checked_choices())

    def _checked_choices(self) -> tuple[str, ...] | str | TaskFunction | None:
        choice = _as_spec(self.doc_to_choice)
        if self.output_type == "generate_until":
            if choice is not None:
                raise ConfigError(f"task `{self.name}`: `doc_to_choice` must be empty for generate_until")
            return None
        if isinstance(choice, (list, tuple)):
            if len(choice) < 2 or not all(isinstance(c, str) for c in choice):
                raise ConfigError(f"task `{self.name}`: `doc_to_choice` must list at least 2 strings, got {choice!r}")
            if len(set(choice)) != len(choice):
                raise ConfigError(f"task `{self.name}`: `doc_to_choice` has duplicates: {list(choice)!r}")
            return tuple(choice)
        if isinstance(choice, TaskFunction) or (isinstance(choice, str) and choice):
            return choice
        raise ConfigError(
            f"task `{self.name}`: `doc_to_choice` must be a list of strings, a field name or `!function` "
            f"for output_type {self.output_type!r}, got {choice!r}"
        )

    def _check_data(self) -> None:
        if self.hub is not None:
            hub = (self.hub,) if isinstance(self.hub, str) else self.hub
            if not isinstance(hub, (list, tuple)) or not 1 <= len(hub) <= 2 or not all(isinstance(h, str) for h in hub):
                raise ConfigError(f"task `{self.name}`: `hub` must be [path] or [path, config], got {self.hub!r}")
            object.__setattr__(self, "hub", tuple(hub))
        object.__setattr__(self, "local_dir", self.local_dir or self.name)
        for key in ("local_dir", "train_split", "test_split"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"task `{self.name}`: `{key}` must be a non-empty string")
        if self.data_files is not None:
            object.__setattr__(self, "data_files", self._checked_data_files())
        if self.holdout is not None:
            object.__setattr__(self, "holdout", Holdout.parse(self.name, self.holdout))
        for key in ("expand", "adapter", "fetch"):
            hook = _as_spec(getattr(self, key))
            if hook is not None and not isinstance(hook, TaskFunction):
                raise ConfigError(f"task `{self.name}`: `{key}` must be a `!function`, got {hook!r}")
            object.__setattr__(self, key, hook)

    def _checked_data_files(self) -> dict[str, str]:
        files = self.data_files
        if not isinstance(files, Mapping) or set(files) != {"train", "test"}:
            raise ConfigError(f"task `{self.name}`: `data_files` must be {{train: path, test: path}}, got {files!r}")
        for split, path in files.items():
            if not isinstance(path, (str, Path)) or Path(path).suffix.lower() not in _DATA_FILE_SUFFIXES:
                raise ConfigError(
                    f"task `{self.name}`: `data_files.{split}` must be a path ending in "
                    f"{', '.join(_DATA_FILE_SUFFIXES)}, got {path!r}"
                )
        return {split: str(path) for split, path in files.items()}

    # --- rendering -------------------------------------------------------------------------
    def render(self, doc: Doc) -> Example:
        """Render one raw document; any mismatch between task and data raises DataError."""
        prompt = self._text(doc)
        if self.output_type == "generate_until":
            return Example(prompt=prompt, answers=self._answers(doc))
        choices = self._choices(doc)
        return Example(prompt=prompt, choices=choices, target=self._target(doc, len(choices)))

    def _text(self, doc: Doc) -> str:
        spec = self.doc_to_text
        return self._call(spec, doc) if isinstance(spec, TaskFunction) else self._format(spec, doc)

    def _value(self, spec: str | TaskFunction, doc: Doc) -> Any:
        """doc_to_choice / doc_to_target: a (dotted) field path or a function."""
        return self._call(spec, doc) if isinstance(spec, TaskFunction) else self._lookup(spec, doc)

    def _call(self, fn: TaskFunction, doc: Doc) -> Any:
        # A prompt function indexes the document directly; name the field it missed.
        try:
            return fn(doc)
        except KeyError as exc:
            raise DataError(
                f"task `{self.name}`: document has no field `{exc.args[0]}` (fields: {_field_names(doc)})"
            ) from None

    def _format(self, template: str, doc: Doc) -> str:
        missing = [name for name in _template_fields(template) if name not in doc]
        if missing:
            raise DataError(
                f"task `{self.name}`: template field `{{{missing[0]}}}` is not in the document "
                f"(fields: {_field_names(doc)})"
            )
        try:
            return template.format_map(doc)
        except (KeyError, IndexError, AttributeError) as exc:
            raise DataError(f"task `{self.name}`: cannot render `doc_to_text` for this document: {exc!r}") from None

    def _lookup(self, path: str, doc: Doc) -> Any:
        value: Any = doc
        for part in path.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise DataError(f"task `{self.name}`: document has no field `{path}` (fields: {_field_names(doc)})")
            value = value[part]
        return value

    def _choices(self, doc: Doc) -> tuple[str, ...]:
        spec = self.doc_to_choice
        assert spec is not None, "only generate_until tasks have no choices; render() does not ask them"
        choices = spec if isinstance(spec, tuple) else self._value(spec, doc)
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"task `{self.name}`: choices must be at least 2 strings, got {choices!r}")
        if len(set(choices)) != len(choices):
            raise DataError(f"task `{self.name}`: choices are not distinct: {list(choices)!r}")
        return tuple(choices)

    def _target(self, doc: Doc, num_choices: int) -> int:
        label = self._value(self.doc_to_target, doc)
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)  # CSV files hold every value as text
        if not is_int(label):
            raise DataError(f"task `{self.name}`: label {label!r} is not an integer index into the choices")
        if not 0 <= label < num_choices:
            raise DataError(f"label {label} outside the {num_choices} choices of task `{self.name}`")
        return int(label)

    def _answers(self, doc: Doc) -> tuple[str, ...]:
        answers = self._value(self.doc_to_target, doc)
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"task `{self.name}`: gold answers must be a non-empty list of strings, got {answers!r}")
        return tuple(answers)

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The YAML keys, functions as ``"!function ref"``: loggable and accepted by ``from_dict``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init or f.name == "version":
                continue
            value = getattr(self, f.name)
            if isinstance(value, TaskFunction):
                value = f"{FUNCTION_TAG} {value.ref}"
            elif isinstance(value, Holdout):
                value = asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        out["metadata"] = {"version": self.version}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskConfig:
        """Build from YAML-shaped keys; unknown or missing keys are ConfigErrors, not TypeErrors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a task config must be a mapping, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls) if f.init and f.name != "version"] + ["metadata"]
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suffix = f" Did you mean: {hint[0]}?" if hint else ""
                raise ConfigError(f"unknown task key `{key}`.{suffix} Allowed: {', '.join(allowed)}")
        for key in ("name", "doc_to_text", "doc_to_target"):
            if key not in data:
                raise ConfigError(f"task config {data.get('name', '')!r} is missing `{key}`")
        kwargs = {k: v for k, v in data.items() if k != "metadata"}
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping) or set(metadata) - {"version"}:
            raise ConfigError(f"task `{data['name']}`: `metadata` may only hold `version`, got {metadata!r}")
        if "version" in metadata:
            kwargs["version"] = metadata["version"]
        return cls(**kwargs)


class TaskLoader(yaml.SafeLoader):
    """SafeLoader plus the ``!function`` tag, so task YAML can point at prompt code (lm-eval style)."""


def _construct_function(loader: yaml.SafeLoader, node: yaml.Node) -> TaskFunction:
    return TaskFunction.resolve(loader.construct_scalar(node))  # type: ignore[arg-type]


TaskLoader.add_constructor(FUNCTION_TAG, _construct_function)


def load_task_yaml(source: str | Path | IO[str]) -> TaskConfig:
    """Read one task YAML file (a path, or an open text stream)."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=TaskLoader)
    else:
        data = yaml.load(source, Loader=TaskLoader)
    return TaskConfig.from_dict(data)
