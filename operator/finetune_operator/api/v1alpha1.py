"""FineTuneJob, API version ``finetune.io/v1alpha1``: the one typed definition of the API.

The CRD schema (``finetune crd``), ``finetune validate``, the operator and the trainer configuration
all derive from these models. Every field carries a description (shown by ``kubectl explain``),
a default where one is sensible, and bounds. Cross-field rules are :class:`~.base.Rule` objects,
enforced both by the API server (CEL) and in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from .base import Rule, SpecModel
from .quantity import quantity_bytes
from .tasks import (
    ALL_METHODS,
    GENERATION_METRICS,
    HIGHER_IS_BETTER,
    IMPLEMENTED_TASKS,
    PROMPT_FORMATS,
    PROMPT_METHODS,
    TASKS,
    DataFormat,
    EarlyStoppingMetric,
    EvalMetric,
    MethodType,
    TaskRow,
    TaskType,
    eval_metric_name,
    task_row,
)

GROUP = "finetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune"]

#: Longest FineTuneJob name: children are named after the job plus a suffix (e.g. ``-workers``) and
#: pod hostnames ``<name>-workers-<index>`` must stay within a 63-character DNS label.
MAX_NAME_LENGTH = 50

# --------------------------------------------------------------------------------------------------
# Reusable constrained types
# --------------------------------------------------------------------------------------------------

_SCHEMES = "s3|gs|gcs|az|abfs|abfss|file"  # file:// may also be followed by an absolute path
#: Object storage or filesystem location: ``s3://bucket/key``, ``gs://…``, ``az://…``, ``file:///p``,
#: or an absolute path (a mounted volume).
STORAGE_URI_PATTERN = rf"^(({_SCHEMES})://[^\s/][^\s]*|file://[^\s]+|/[^\s]*)$"
#: Data may also be a path relative to the manifest (``finetune run``) or the image's working dir.
DATA_URI_PATTERN = rf"^(({_SCHEMES})://[^\s/][^\s]*|file://[^\s]+|/[^\s]*|\.{{0,2}}/?[A-Za-z0-9_][^\s:]*)$"
#: A model: a storage location, a Hugging Face Hub id (``org/name`` or ``name``), a local path, or
#: ``pkg://<python-package>`` for model files shipped inside an installed Python package.
#: ``ftj://NAME``: the merged model another FineTuneJob of the same namespace wrote (resolved by the
#: operator from that job's status.artifacts when it has succeeded; by ``finetune run`` from an earlier
#: local run of it).
JOB_URI_SCHEME = "ftj"
#: The status.artifacts kinds an ``ftj://`` model resolves to: the merged model, or a `full` job's model.
MODEL_ARTIFACT_KINDS = ("merged", "model")
_JOB_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
MODEL_URI_PATTERN = (
    rf"^(({_SCHEMES}|pkg)://[^\s/][^\s]*|{JOB_URI_SCHEME}://{_JOB_NAME}|file://[^\s]+|/[^\s]*"
    rf"|\.{{0,2}}/?[A-Za-z0-9_][^\s:]*)$"
)
#: A positive resource quantity, by Kubernetes' grammar (``500m``, ``4``, ``16Gi``, ``1e3``): a decimal
#: number with a non-zero digit, no minus sign, then one binary (Ki..Ei) or decimal (n..E) suffix or an
#: exponent.
QUANTITY_PATTERN = (
    r"^\+?([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?[0-9]+))?$"
)
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A Kubernetes qualified name (label and annotation keys, taint keys): an optional DNS-subdomain
#: prefix and ``/``, then a name of at most 63 characters. The prefix is at most 253 characters
#: (:func:`is_qualified_name` checks it; CEL rules use ``indexOf('/') <= 253``).
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
#: The characters of a label value (its length, at most 63, is a separate bound): empty, or letters,
#: digits, ``-``, ``_`` and ``.``, beginning and ending with a letter or digit.
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
#: An extended resource name, such as ``nvidia.com/gpu``: a domain prefix is required.
EXTENDED_RESOURCE_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
NO_WHITESPACE_PATTERN = r"^[^\s]+$"
GGUF_FILE_PATTERN = r"^[^\s/][^\s]*\.gguf$"
OBJECT_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
ENDPOINT_URL_PATTERN = r"^https?://[^\s/]+(/[^\s]*)?$"
QUEUE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SHA256_PATTERN = r"^[a-f0-9]{64}$"
#: Environment variables the trainer reads only in tests (fault injection, e.g. a non-finite loss at a
#: chosen step). No manifest can set them: spec.resources.env refuses every name with this prefix.
TEST_HOOK_ENV_PREFIX = "FINETUNE_TEST_"
#: NVIDIA GPU feature discovery's node label: the memory of each GPU of the node, in MiB.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
#: Human wording of the patterns above, used in error messages instead of the regular expression.
LABEL_NAME_WORDS = "at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or digit"
QUALIFIED_NAME_HINT = f"an optional DNS subdomain prefix and '/', then a name of {LABEL_NAME_WORDS}"
LABEL_VALUE_HINT = f"empty, or {LABEL_NAME_WORDS}"
QUANTITY_HINT = "must be a positive Kubernetes quantity such as 4, 500m, 1.5 or 16Gi"
PATTERN_HINTS = {
    STORAGE_URI_PATTERN: "must be s3://, gs://, az://, file:// or an absolute path",
    DATA_URI_PATTERN: "must be a path, file://, s3://, gs:// or az://",
    MODEL_URI_PATTERN: "must be a Hub id (org/name), s3://, gs://, az://, file://, pkg:// or a path",
    QUANTITY_PATTERN: QUANTITY_HINT,
    DNS_SUBDOMAIN_PATTERN: (
        "must be a DNS subdomain: lower-case letters, digits, '-' and '.', beginning and ending with a letter or digit"
    ),
    DNS_LABEL_PATTERN: "must be a DNS label: lower case letters, digits and '-', starting with a letter",
    ENV_NAME_PATTERN: (
        "must be an environment variable name: letters, digits, '_', '-' and '.', not starting with a digit"
    ),
    NAMESPACE_PATTERN: (
        "must be a DNS label: lower-case letters, digits and '-', beginning and ending with a letter or digit"
    ),
    QUALIFIED_NAME_PATTERN: f"must be {QUALIFIED_NAME_HINT}",
    LABEL_VALUE_PATTERN: f"must be a label value: {LABEL_VALUE_HINT}",
    EXTENDED_RESOURCE_PATTERN: (
        f"must be an extended resource name such as nvidia.com/gpu: a domain, '/', then a name of {LABEL_NAME_WORDS}"
    ),
    NO_WHITESPACE_PATTERN: "must not be empty or contain whitespace",
    GGUF_FILE_PATTERN: "must be the name of a .gguf file inside spec.model.uri, without spaces",
    OBJECT_KEY_PATTERN: "must be a key: letters, digits, '-', '_' and '.'",
    ENDPOINT_URL_PATTERN: "must be an http:// or https:// URL, such as https://minio.example:9000",
    QUEUE_NAME_PATTERN: "must be lower-case letters, digits, '-' and '.', beginning and ending with a letter or digit",
    SHA256_PATTERN: "must be 64 lower-case hexadecimal digits",
    CONDITION_REASON_PATTERN: "must be a CamelCase reason: letters, digits, '_', ',' and ':', starting with a letter",
}


def is_qualified_name(value: str) -> bool:
    """A Kubernetes qualified name (label/annotation key): QUALIFIED_NAME_PATTERN, prefix <= 253."""
    return re.fullmatch(QUALIFIED_NAME_PATTERN, value) is not None and value.find("/") <= 253


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and re.fullmatch(LABEL_VALUE_PATTERN, value) is not None


def _cel_qualified_name(expr: str) -> str:
    return f"{expr}.matches(r'{QUALIFIED_NAME_PATTERN}') && {expr}.indexOf('/') <= 253"


StorageUri = Annotated[str, Field(pattern=STORAGE_URI_PATTERN, max_length=2048)]
DataUri = Annotated[str, Field(pattern=DATA_URI_PATTERN, max_length=2048)]
ModelUri = Annotated[str, Field(pattern=MODEL_URI_PATTERN, max_length=2048)]
KubeName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
ModuleName = Annotated[str, Field(min_length=1, max_length=256, pattern=NO_WHITESPACE_PATTERN)]

QUANTITY_MAX_LENGTH = 64


def _check_quantity(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return str(value)
    elif isinstance(value, str):
        if len(value) <= QUANTITY_MAX_LENGTH and re.fullmatch(QUANTITY_PATTERN, value):
            return value
    elif isinstance(value, float):
        raise PydanticCustomError(
            "quantity",
            QUANTITY_HINT + ", written as an integer or a string (quote a decimal: {example})",
            {"example": f'"{value}"'},
        )
    raise PydanticCustomError("quantity", QUANTITY_HINT)


#: A positive Kubernetes resource quantity, written as an integer or a string (``4``, ``"500m"``,
#: ``"16Gi"``); kept as its string form. One message for every way it can be wrong (an int-or-string
#: union would report one per branch).
Quantity = Annotated[
    str,
    PlainValidator(_check_quantity, json_schema_input_type=int | str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer"},
                {"type": "string", "pattern": QUANTITY_PATTERN, "maxLength": QUANTITY_MAX_LENGTH},
            ]
        }
    ),
]


def _is_quantity(value: str | None) -> bool:
    return value is None or re.fullmatch(QUANTITY_PATTERN, value) is not None


def _cel_positive_quantity(field: str) -> Rule:
    """The integer form of a quantity must be positive (the CRD's int-or-string pattern covers strings)."""
    return Rule(
        cel=f"!has(self.{field}) || type(self.{field}) != int || self.{field} > 0",
        message=f"spec.resources.{field} {QUANTITY_HINT}",
        check=lambda m: _is_quantity(getattr(m, _snake(field))),
        field=f".{field}",
    )


Precision = Literal["auto", "bf16", "fp16", "fp32"]


def immutable(path: str) -> dict[str, Any]:
    """A CEL transition rule: the field keeps the value it was created with.

    Only the API server can enforce it (it needs the old object); ``finetune validate`` checks one
    manifest at a time.
    """
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"{path} cannot change after the job is created"}
        ]
    }


# --------------------------------------------------------------------------------------------------
# spec.model
# --------------------------------------------------------------------------------------------------


class MineTokensSpec(SpecModel):
    """Domain vocabulary mined from a corpus: its frequent words that the tokenizer splits into many
    pieces, added to the tokenizer (as spec.model.addTokens are)."""

    corpus: DataSource | None = Field(
        default=None,
        description=(
            "Text records to mine (their `column`); default: the training records, every text of them "
            "(prompts, completions, messages, ...; not the records evalSplit holds out)."
        ),
    )
    column: str = Field(default="text", max_length=256, description="The column of `corpus` holding the text.")
    min_pieces: int = Field(
        default=3,
        ge=2,
        le=64,
        description="Words the tokenizer splits into at least this many tokens (alone and after a space).",
    )
    min_count: int = Field(default=5, ge=1, description="Words that occur at least this many times.")
    max_tokens: int = Field(
        default=64,
        ge=1,
        le=1024,
        description=(
            "At most this many words are added: the most frequent first (ties in code-point order). A word "
            "is a run of letters, digits and underscores with at least one letter, as written (case kept)."
        ),
    )


class ModelSpec(SpecModel):
    """The pretrained model to start from, and how to load it."""

    uri: ModelUri = Field(
        description=(
            "Where the base model comes from: a Hugging Face Hub id (`org/name`), an object-storage "
            "prefix (`s3://`, `gs://`, `az://`), `file://` or a mounted path, `pkg://<package>` for "
            "model files shipped inside an installed Python package, or `ftj://<name>`: the merged model "
            "FineTuneJob <name> of this namespace writes (this job waits for it to succeed)."
        ),
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        pattern=NO_WHITESPACE_PATTERN,
        description="Hub revision (branch, tag or commit sha). Only used for Hub ids.",
    )
    gguf_file: str | None = Field(
        default=None,
        max_length=255,
        pattern=GGUF_FILE_PATTERN,
        description="Name of a GGUF file inside `uri`; the weights are dequantized at load time.",
    )
    dtype: Precision = Field(
        default="auto",
        description="Data type the weights are loaded in. `auto` keeps the checkpoint's own dtype.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repository to run its own Python code. Leave off unless you trust it.",
    )
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        default="auto",
        description=(
            "Attention implementation. `auto` leaves the choice to transformers: `sdpa` (PyTorch's "
            "scaled-dot-product attention) where the model supports it, else `eager`."
        ),
    )
    add_tokens: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=1024,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description=(
            "Tokens to add to the tokenizer. The embedding matrix is resized and the new rows are "
            "trained, also under PEFT methods. A new row starts as the mean of the embeddings of the "
            "pieces the tokenizer split the token into (input and, when untied, output embeddings)."
        ),
    )
    mine_tokens: MineTokensSpec | None = Field(
        default=None,
        description=(
            "Also add the domain's words: mined from the training data (or a corpus) before tokenization, "
            "identically on every rank; initialised as addTokens are, listed in summary.json, saved with "
            "the tokenizer."
        ),
    )
    chat_template: str | None = Field(
        default=None,
        max_length=65536,
        description="A Jinja chat template that replaces the tokenizer's own (used by the `chat` format).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            # A path (absolute, ./ or ../) or a URI with a scheme is not a Hub id: no revision to check out.
            cel="!has(self.revision) || !self.uri.matches('^([a-z0-9]+://|[.]{0,2}/)')",
            message="spec.model.revision is only used for Hub ids (org/name), not for a path or a URI with a scheme",
            check=lambda m: m.revision is None or re.match(r"^([a-z0-9]+://|\.{0,2}/)", m.uri) is None,
            field=".revision",
        ),
    )


# --------------------------------------------------------------------------------------------------
# spec.task
# --------------------------------------------------------------------------------------------------


class ClassificationParams(SpecModel):
    """Parameters of sequence classification."""

    num_labels: int = Field(ge=2, le=100000, description="Number of classes.")
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        max_length=100000,
        description="Class names, in label-id order. The label column may hold these names or ids.",
    )
    multi_label: bool = Field(
        default=False, description="Each example may belong to several classes (sigmoid + BCE loss)."
    )
    class_weights: list[Annotated[float, Field(gt=0, le=1e6)]] | None = Field(
        default=None,
        max_length=100000,
        description="Per-class loss weights, in label-id order, to counter class imbalance.",
    )
    balance_class_weights: bool = Field(
        default=False,
        description="Weight each class by the inverse of its frequency in the training data.",
    )
    resampling: Literal["none", "oversample", "undersample"] = Field(
        default="none",
        description=(
            "Resample the training data so classes are seen equally often: each epoch holds as many "
            "examples of every class as the largest class has (`oversample`) or as the smallest has "
            "(`undersample`). Single-label only."
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.classWeights) || size(self.classWeights) == self.numLabels",
            message="spec.task.classification.classWeights must have numLabels entries",
            check=lambda m: m.class_weights is None or len(m.class_weights) == m.num_labels,
            field=".classWeights",
        ),
        Rule(
            cel="!has(self.labels) || size(self.labels) == self.numLabels",
            message="spec.task.classification.labels must have numLabels entries",
            check=lambda m: m.labels is None or len(m.labels) == m.num_labels,
            field=".labels",
        ),
        Rule(
            cel="!(has(self.classWeights) && self.balanceClassWeights)",
            message=("spec.task.classification.balanceClassWeights and classWeights are mutually exclusive"),
            check=lambda m: not (m.class_weights is not None and m.balance_class_weights),
            field=".balanceClassWeights",
        ),
        Rule(
            cel="!(self.multiLabel && self.resampling != 'none')",
            message=(
                "spec.task.classification.resampling balances the classes of single-label data; with "
                "multiLabel, weigh the classes instead (classWeights or balanceClassWeights)"
            ),
            check=lambda m: not (m.multi_label and m.resampling != "none"),
            field=".resampling",
        ),
    )


#: spec.task.qa.docStride when unset.
QA_DOC_STRIDE = 128


class QAParams(SpecModel):
    """Parameters of extractive question answering (answer spans in a context)."""

    doc_stride: int = Field(
        default=QA_DOC_STRIDE,
        ge=0,
        le=8192,
        description="Overlap, in tokens, between windows of a long context; below spec.data.maxSeqLength.",
    )
    max_answer_length: int = Field(default=30, ge=1, le=4096, description="Longest answer span considered, in tokens.")


#: spec.task.dpo.lossType: the DPO objectives, as trl's DPOTrainer computes them (its name in brackets).
DPOLossType = Literal[
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exoPair",
    "bcoPair",
    "ncaPair",
    "sppoHard",
    "apoZero",
    "apoDown",
    "sigmoidNorm",
]
#: The DPO objectives that read spec.task.dpo.labelSmoothing.
DPO_SMOOTHED_LOSSES = ("robust", "exoPair")


class DPOParams(SpecModel):
    """Parameters of Direct Preference Optimization."""

    beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="Strength of the implicit KL penalty to the reference (for `ipo`, its regularisation tau).",
    )
    loss_type: DPOLossType = Field(
        default="sigmoid",
        description=(
            "DPO objective: `sigmoid` (DPO), `ipo` (IPO), `hinge` (SLiC), `robust` (robust DPO, for noisy "
            "labels: labelSmoothing is the probability a label is flipped), `exoPair` (EXO), `bcoPair` (BCO), "
            "`ncaPair` (NCA), `sppoHard` (SPPO), `apoZero` and `apoDown` (anchored preference optimisation: "
            "raise, or lower, the chosen likelihood) or `sigmoidNorm` (DPO on length-normalised "
            "log-probabilities)."
        ),
    )
    label_smoothing: float | None = Field(
        default=None,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is wrong (`robust`, `exoPair` only; default 0).",
    )
    reference_model: ModelUri | None = Field(
        default=None,
        description=(
            "Reference model. Default: the base model (for PEFT methods, the policy with its adapter "
            "disabled: no second copy in memory)."
        ),
    )
    precompute_reference_log_probs: bool = Field(
        default=False,
        description=(
            "Compute the reference model's log-probabilities of every training and eval pair once, before "
            "training, and keep no reference model in memory while training."
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=f"!has(self.labelSmoothing) || self.lossType in {list(DPO_SMOOTHED_LOSSES)}",
            message="spec.task.dpo.labelSmoothing is only used by spec.task.dpo.lossType robust and exoPair",
            check=lambda m: m.label_smoothing is None or m.loss_type in DPO_SMOOTHED_LOSSES,
            field=".labelSmoothing",
        ),
        Rule(
            cel="self.lossType != 'exoPair' || (has(self.labelSmoothing) && self.labelSmoothing > 0.0)",
            message=(
                "spec.task.dpo.lossType exoPair needs spec.task.dpo.labelSmoothing above 0 (EXO's epsilon, e.g. 0.001)"
            ),
            check=lambda m: m.loss_type != "exoPair" or (m.label_smoothing or 0) > 0,
            field=".labelSmoothing",
        ),
    )


class RewardParams(SpecModel):
    """Parameters of reward-model training on preference pairs."""

    center_rewards_coefficient: float | None = Field(
        default=None, ge=0, le=100, description="Weight of a penalty that keeps rewards centred on zero."
    )


#: spec.task.rl.rewards[].type: the verifiable rewards, computed by the trainer without a model.
RewardType = Literal["exactMatch", "contains", "regex", "jsonValid", "length"]

# A spec.task.rl.rewards[].pattern is a regular expression in a subset that Python's ``re`` (``finetune
# validate``, the trainer) and RE2 (the API server's CEL) read alike, so that the same patterns are
# accepted by both and match the same text. The subset is itself a regular language, checked by the
# one expression below in CEL and in Python: alternatives of atoms, each with at most one greedy
# quantifier; an atom is a literal character, an escaped metacharacter, ``.``, ``\d \D \w \W \t \n``, or a
# bracket class of single characters, the ranges a-z, A-Z and 0-9 and those escapes. Left out, each for
# a reason: groups (RE2 and ``re`` differ in back-references, look-arounds and named groups; nested
# quantifiers are what makes ``re`` backtrack for ever), ``\s`` (``re`` counts \v as a space, RE2 does
# not), counted repetition {m,n} (a reversed range is an error only one side would catch at matching
# time), lazy and possessive quantifiers, and other character ranges (``[z-a]`` would be accepted here
# and fail to compile). ``$`` is the end of the text, as in RE2 (the trainer matches it as ``\Z``:
# Python's ``$`` would also match before a final newline); ``\d`` and ``\w`` are ASCII, as in RE2.
_RX_LITERAL = r"[A-Za-z0-9 _,:;!@#%&=~\"<>/-]"
_RX_ESCAPE = r"\\[dDwWtn.\\^$|?*+()\[\]{}/-]"
_RX_CLASS = r"\[\^?(a-z|A-Z|0-9|\\[dDwWtn\\\]\[^-]|[A-Za-z0-9 _,.:;!@#%&=~\"<>/*+?(){}|$])+\]"
_RX_ATOM = rf"({_RX_ESCAPE}|{_RX_LITERAL}|\.|{_RX_CLASS})[*+?]?"
_RX_BRANCH = rf"\^?({_RX_ATOM})+\$?"
#: The regular expressions spec.task.rl.rewards[].pattern may be (see above).
REWARD_PATTERN_GRAMMAR = rf"^{_RX_BRANCH}(\|{_RX_BRANCH})*$"
REWARD_PATTERN_HINT = (
    "must be a regular expression of the subset Python and RE2 read alike: alternatives (|) of characters, "
    "escaped metacharacters, '.', \\d \\D \\w \\W \\t \\n and bracket classes (ranges a-z, A-Z, 0-9 only), each "
    "with at most one of * + ?, each alternative optionally anchored at its start and end; no groups, no counted "
    "repetition, no \\s"
)


class RewardSpec(SpecModel):
    """A verifiable reward: a score of each generated completion computed without a model."""

    type: RewardType = Field(
        description=(
            "`exactMatch`: 1 when the completion, stripped of surrounding whitespace, equals the record's "
            "reference answer (its completion, or its last assistant turn), else 0; `contains`: 1 when the "
            "completion contains the stripped reference; `regex`: 1 when `pattern` matches somewhere in the "
            "completion; `jsonValid`: 1 when the stripped completion parses as a JSON object or array (a bare "
            "number or string would be a trivial way to score); `length`: 1 when the completion's token count "
            "is within [minTokens, maxTokens]. Each is 0 otherwise."
        ),
    )
    weight: float = Field(
        default=1.0,
        ge=-100,
        le=100,
        description=(
            "Weight of this reward in the sum of rewards (the reward model, if any, weighs 1). Negative: a penalty."
        ),
    )
    pattern: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description=f"The regular expression of a `regex` reward; it {REWARD_PATTERN_HINT}.",
    )
    min_tokens: int | None = Field(
        default=None, ge=0, le=32768, description="Fewest completion tokens a `length` reward scores 1 (default 0)."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=32768, description="Most completion tokens a `length` reward scores 1 (default none)."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.weight != 0.0",
            message="spec.task.rl.rewards[].weight must not be 0 (leave the reward out instead)",
            check=lambda m: m.weight != 0,
            field=".weight",
        ),
        Rule(
            cel="has(self.pattern) == (self.type == 'regex')",
            message="spec.task.rl.rewards[].pattern is required for type regex and only used by it",
            check=lambda m: (m.pattern is not None) == (m.type == "regex"),
            field=".pattern",
        ),
        Rule(
            cel=f"!has(self.pattern) || self.pattern.matches(r'{REWARD_PATTERN_GRAMMAR}')",
            message=f"spec.task.rl.rewards[].pattern {REWARD_PATTERN_HINT}",
            check=lambda m: m.pattern is None or re.fullmatch(REWARD_PATTERN_GRAMMAR, m.pattern) is not None,
            field=".pattern",
        ),
        Rule(
            cel="(has(self.minTokens) || has(self.maxTokens)) == (self.type == 'length')",
            message="spec.task.rl.rewards[] type length needs minTokens or maxTokens, which only it uses",
            check=lambda m: (m.min_tokens is not None or m.max_tokens is not None) == (m.type == "length"),
            field=".type",
        ),
        Rule(
            cel="!has(self.minTokens) || !has(self.maxTokens) || self.minTokens <= self.maxTokens",
            message="spec.task.rl.rewards[].minTokens must not exceed maxTokens",
            check=lambda m: m.min_tokens is None or m.max_tokens is None or m.min_tokens <= m.max_tokens,
            field=".minTokens",
        ),
    )


#: spec.task.rl.klCoef when unset: the KL weight of the GRPO paper (DeepSeekMath), trl's own default until it
#: chose 0 (no reference model) for speed.
RL_KL_COEF = 0.04


class PPOParams(SpecModel):
    """Parameters of PPO (``spec.task.rl.algorithm: ppo``), the trainer's own implementation: a value head on
    the policy's last hidden state, generalised advantage estimation over the completion's tokens, the clipped
    surrogate objective and a clipped value loss, several optimizer steps on each batch of rollouts. The
    defaults are those of trl's last PPO trainer (PPOConfig of trl 0.x) and of the InstructGPT recipe."""

    epochs: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "PPO epochs: optimizer steps taken on each batch of rollouts (a step's completions are generated "
            "once and trained on this many times, so the run's steps count each)."
        ),
    )
    clip_range: float = Field(
        default=0.2,
        gt=0,
        le=10,
        description=(
            "epsilon of the clipped surrogate: the probability ratio to the rollout policy is clipped to 1 +- it."
        ),
    )
    value_clip_range: float = Field(
        default=0.2,
        gt=0,
        le=1000,
        description="How far a value prediction may move from its rollout value before its loss is clipped.",
    )
    value_coef: float = Field(default=0.1, gt=0, le=100, description="Weight of the value loss beside the policy loss.")
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount of later token rewards in the advantages.")
    gae_lambda: float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="lambda of generalised advantage estimation (1: Monte-Carlo returns; 0: one-step TD).",
    )
    whiten_advantages: bool = Field(
        default=True,
        description="Scale the advantages of each micro-batch to mean 0 and standard deviation 1 before the loss.",
    )


class RLParams(SpecModel):
    """Parameters of online reinforcement learning: completions sampled from the policy, scored by a reward
    model and/or verifiable rewards, and the policy moved towards the better ones (GRPO, RLOO, PPO).

    What trl 1.16 decides and we keep: GRPO's loss is trl's default ``dapo`` (token losses summed over the
    whole accumulated batch and divided by its completion tokens: no length bias), rewards are scaled by
    the standard deviation of their group (``scale_rewards=group``), one policy update per generation
    (``num_iterations=1``, so the clipped ratio is 1 and clipping at 0.2 never acts), nucleus sampling off
    (top_p 1, top_k 0). What we change: the KL weight, ``klCoef``, defaults to 0.04 where trl's GRPO
    defaults to 0 and its RLOO to 0.05 — one default for both algorithms, keeping the policy near its
    start unless the manifest says otherwise. In GRPO the KL is a loss term; in RLOO it is subtracted
    from the reward (as the RLOO paper does).
    """

    algorithm: Literal["ppo", "grpo", "rloo"] = Field(
        default="grpo",
        description=(
            "Online RL algorithm: `grpo` (group-relative advantages: each completion's reward less its group's "
            "mean, over the group's standard deviation), `rloo` (REINFORCE leave-one-out: less the mean of the "
            "other completions of its prompt) or `ppo` (a learned value head and generalised advantage "
            "estimation per token, the KL to the reference as a per-token reward penalty, spec.task.rl.ppo)."
        ),
    )
    reward_model: ModelUri | None = Field(
        default=None,
        description=(
            "A reward model that scores prompt + completion (a sequence-classification model with one output, "
            "e.g. the output of a `reward` job); it must use the policy's tokenizer."
        ),
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        max_length=16,
        description="Verifiable rewards, summed with their weights (and the reward model's score, if any).",
    )
    num_generations: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "Completions sampled per prompt (the group). spec.training.perDeviceBatchSize counts completions "
            "and must be a multiple of it."
        ),
    )
    max_new_tokens: int = Field(default=128, ge=1, le=32768, description="Longest generated completion, in tokens.")
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature.")
    kl_coef: float = Field(
        default=RL_KL_COEF,
        ge=0,
        le=100,
        description="Weight of the KL penalty to the reference policy (the starting model); 0 loads no reference.",
    )
    ppo: PPOParams | None = Field(
        default=None, description="PPO's parameters (algorithm ppo only; their defaults when unset)."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.ppo) || self.algorithm == 'ppo'",
            message="spec.task.rl.ppo is only used by spec.task.rl.algorithm ppo",
            check=lambda m: m.ppo is None or m.algorithm == "ppo",
            field=".ppo",
        ),
        Rule(
            cel="self.algorithm == 'ppo' || self.numGenerations >= 2",
            message="spec.task.rl.numGenerations must be at least 2 for grpo and rloo",
            check=lambda m: m.algorithm == "ppo" or m.num_generations >= 2,
            field=".numGenerations",
        ),
        Rule(
            cel="has(self.rewardModel) || (has(self.rewards) && size(self.rewards) > 0)",
            message="spec.task.rl needs a rewardModel or at least one of rewards to score completions with",
            check=lambda m: m.reward_model is not None or bool(m.rewards),
            field=".rewards",
        ),
    )


class DistillParams(SpecModel):
    """Parameters of logit distillation from a teacher model: the student (spec.model, trained by
    spec.method) learns ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy`` on
    the positions the labels train (those SFT trains on), where ``_T`` is the softmax at temperature T."""

    teacher: ModelUri = Field(
        description=(
            "The teacher model: any model URI (a Hub id, a path, object storage, `pkg://`, or `ftj://NAME`, another "
            "job's merged output). It must have the student's vocabulary (the same tokens with the same ids); "
            "frozen, in eval mode, loaded in spec.model.dtype with spec.model's attention and trustRemoteCode."
        )
    )
    temperature: float = Field(
        default=2.0, gt=0, le=100, description="Softmax temperature T of teacher and student logits in the KL term."
    )
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Weight of the distillation (KL) term; 1 - alpha weighs the cross-entropy on the labels.",
    )
    teacher_quantization: Literal["none", "nf4", "fp4"] = Field(
        default="none",
        description=(
            "Load the teacher quantized to 4 bits by bitsandbytes (`nf4` or `fp4`, as spec.method.quantization."
            "quantType; double quantization, matmuls in spec.model.dtype, bf16 for auto) to save memory, or "
            "`none`. Not with spec.distributed.deepspeed.zeroStage 3 (a quantized model is not partitioned)."
        ),
    )


def _params_only_for(task: str, field: str) -> Rule:
    return Rule(
        cel=f"!has(self.{field}) || self.type == '{task}'",
        message=f"spec.task.{field} is only allowed when spec.task.type is {task}",
        check=lambda m: getattr(m, _snake(field)) is None or m.type == task,
        field=f".{field}",
    )


def _params_required_for(task: str, field: str) -> Rule:
    return Rule(
        cel=f"self.type != '{task}' || has(self.{field})",
        message=f"spec.task.{field} is required when spec.task.type is {task}",
        check=lambda m: m.type != task or getattr(m, _snake(field)) is not None,
        field=".type",
    )


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _series(values: tuple[str, ...] | list[str], last: str) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" {last} " + values[-1]


#: The tasks this release trains, for the field descriptions: "`sft`, `pretrain` and `qa`".
_TRAINED_TASKS = _series([f"`{t}`" for t in IMPLEMENTED_TASKS], "and")
_TRAINED_SENTENCE = (
    "This release trains every one."
    if len(IMPLEMENTED_TASKS) == len(TASKS)
    else f"This release trains {_TRAINED_TASKS}; the others are refused at admission until their recipes land."
)


def _metrics_of_trained_tasks(metrics: Callable[[TaskRow], tuple[str, ...]]) -> str:
    """What each trained task measures, for the field descriptions: "`loss` or `perplexity` for sft
    and pretrain; `loss`, `exactMatch` or `f1` for qa"."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for row in TASKS:
        if row.implemented:
            groups.setdefault(metrics(row), []).append(row.type)
    return "; ".join(
        f"{_series([f'`{m}`' for m in names], 'or')} for {_series(tasks, 'and')}" for names, tasks in groups.items()
    )


class TaskSpec(SpecModel):
    """What the model learns: the training objective and its parameters."""

    type: TaskType = Field(
        default="sft",
        description=(
            "Training objective: `sft` (supervised fine-tuning), `pretrain` (continual pre-training on "
            "raw text), `classification`, `qa` (extractive question answering), `reward` (reward "
            f"model), `dpo`, `rl` (online RL against a reward model) or `distill` (logit distillation from "
            f"spec.task.distill.teacher). {_TRAINED_SENTENCE}"
        ),
    )
    classification: ClassificationParams | None = Field(
        default=None, description="Classification parameters; required for `classification`."
    )
    qa: QAParams | None = Field(default=None, description="Extractive QA parameters.")
    dpo: DPOParams | None = Field(default=None, description="DPO parameters.")
    reward: RewardParams | None = Field(default=None, description="Reward-model parameters.")
    rl: RLParams | None = Field(default=None, description="Online RL parameters; required for `rl`.")
    distill: DistillParams | None = Field(default=None, description="Distillation parameters; required for `distill`.")

    rules: ClassVar[tuple[Rule, ...]] = (
        _params_required_for("classification", "classification"),
        _params_required_for("rl", "rl"),
        _params_required_for("distill", "distill"),
        _params_only_for("classification", "classification"),
        _params_only_for("qa", "qa"),
        _params_only_for("dpo", "dpo"),
        _params_only_for("reward", "reward"),
        _params_only_for("rl", "rl"),
        _params_only_for("distill", "distill"),
    )


# --------------------------------------------------------------------------------------------------
# spec.method
# --------------------------------------------------------------------------------------------------


#: LoRA rank of `lora` and `qlora` when spec.method.lora.r is not set.
DEFAULT_LORA_RANK = 16


class LoRAParams(SpecModel):
    """Low-rank adapter parameters, shared by `lora`, `qlora` and `adalora`."""

    r: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            f"Rank of the update matrices of `lora` and `qlora` (default {DEFAULT_LORA_RANK}). Not for "
            "`adalora`, whose ranks are spec.method.adalora.initR and targetR."
        ),
    )
    alpha: float = Field(default=32, gt=0, le=65536, description="Scaling numerator (update * alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=256,
        description=(
            "Module names (or suffixes) to adapt, e.g. `q_proj`, `v_proj`; `all-linear` adapts every "
            "linear layer except the output head."
        ),
    )
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases are trained.")
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised scaling (alpha / sqrt(r)); `lora` and `qlora` only."
    )
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA); `lora` and `qlora` only.")
    modules_to_save: list[ModuleName] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full and saved with the adapter (e.g. a classification head).",
    )

    @property
    def rank(self) -> int:
        """The rank `lora` and `qlora` train with: ``r``, or :data:`DEFAULT_LORA_RANK` when unset."""
        return DEFAULT_LORA_RANK if self.r is None else self.r


class QuantizationParams(SpecModel):
    """4-bit quantization of the frozen base model (QLoRA)."""

    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(
        default=True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Data type the 4-bit weights are dequantized to for matmuls."
    )


class PrefixParams(SpecModel):
    """Prefix tuning: trained key/value prefixes in every attention layer."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=4096, description="Length of the prefix.")
    projection: bool = Field(
        default=False, description="Reparameterize the prefix through an MLP (more stable, more memory)."
    )


class PromptParams(SpecModel):
    """Prompt tuning: trained soft-prompt embeddings prepended to the input."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=4096, description="Length of the soft prompt.")
    init_text: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Initialize the soft prompt from the embeddings of this text instead of randomly.",
    )


class IA3Params(SpecModel):
    """(IA)³: trained rescaling vectors on attention and feed-forward activations."""

    target_modules: list[ModuleName] | None = Field(
        default=None,
        max_length=256,
        description="Modules to rescale. Default: the model family's key, value and down projections.",
    )
    feedforward_modules: list[ModuleName] | None = Field(
        default=None,
        max_length=256,
        description=(
            "Which of `targetModules` are feed-forward layers (scaled on their input; the others on their "
            "output); needs `targetModules`. Default: the model family's, e.g. the down projection."
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "!has(self.feedforwardModules) || "
                "(has(self.targetModules) && self.feedforwardModules.all(m, m in self.targetModules))"
            ),
            message="spec.method.ia3.feedforwardModules must be among spec.method.ia3.targetModules (set both)",
            check=lambda m: (
                m.feedforward_modules is None
                or (m.target_modules is not None and set(m.feedforward_modules) <= set(m.target_modules))
            ),
            field=".feedforwardModules",
        ),
    )


class AdaLoRAParams(SpecModel):
    """AdaLoRA: LoRA whose rank budget is reallocated during training by importance."""

    init_r: int = Field(default=12, ge=1, le=4096, description="Initial rank of every adapted matrix.")
    target_r: int = Field(default=8, ge=1, le=4096, description="Average rank after budget pruning; below initR.")
    tinit: int = Field(default=0, ge=0, description="Warm-up steps before the budget starts to shrink.")
    tfinal: int = Field(default=0, ge=0, description="Final steps trained at the target budget.")
    delta_t: int = Field(default=1, ge=1, description="Steps between two budget reallocations.")
    beta1: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of importance sensitivity.")
    beta2: float = Field(default=0.85, gt=0, lt=1, description="EMA factor of importance uncertainty.")
    orth_reg_weight: float = Field(default=0.5, ge=0, le=100, description="Weight of the orthogonality regularizer.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            # Equal ranks leave nothing to prune, and peft's allocator fails at its first reallocation.
            cel="self.targetR < self.initR",
            message="spec.method.adalora.targetR must be below initR (AdaLoRA prunes the ranks from initR to targetR)",
            check=lambda m: m.target_r < m.init_r,
            field=".targetR",
        ),
    )


class FreezeSpec(SpecModel):
    """Partial fine-tuning: train only part of the network (method `full`)."""

    head_only: bool = Field(
        default=False,
        description="Train only the output head (a head tied to the input embeddings trains that matrix).",
    )
    last_layers: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description=(
            "Train only the last N transformer blocks, plus the final norm and an untied output head (a head "
            "tied to the input embeddings stays frozen with them)."
        ),
    )
    patterns: list[Annotated[str, Field(min_length=1, max_length=512)]] = Field(
        default_factory=list,
        max_length=256,
        description="Regular expressions; parameters whose names match are frozen.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(self.headOnly && has(self.lastLayers))",
            message="spec.method.freeze.headOnly and lastLayers are mutually exclusive",
            check=lambda m: not (m.head_only and m.last_layers is not None),
            field=".lastLayers",
        ),
    )


PEFT_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3", "adalora")


def _method_params_only_for(methods: tuple[str, ...], field: str) -> Rule:
    listed = ", ".join(methods)
    cel_methods = ", ".join(f"'{m}'" for m in methods)
    return Rule(
        cel=f"!has(self.{field}) || self.type in [{cel_methods}]",
        message=f"spec.method.{field} is only allowed when spec.method.type is one of: {listed}",
        check=lambda m: getattr(m, _snake(field)) is None or m.type in methods,
        field=f".{field}",
    )


class MethodSpec(SpecModel):
    """Which parameters are trained: the full model, part of it, or a parameter-efficient adapter."""

    type: MethodType = Field(
        default="lora",
        description=(
            "`full` (all parameters, or those left by `freeze`), `lora`, `qlora` (LoRA on a 4-bit "
            "base), `prefix`, `prompt`, `ia3` or `adalora`."
        ),
    )
    lora: LoRAParams | None = Field(
        default=None,
        description=(
            "Adapter parameters of `lora` and `qlora` (defaults apply when unset); `adalora` uses alpha, "
            "dropout, targetModules, bias and modulesToSave (its ranks are in spec.method.adalora). "
            "Refused with other methods."
        ),
    )
    quantization: QuantizationParams | None = Field(
        default=None, description="4-bit quantization of the base model (`qlora`; defaults apply)."
    )
    prefix: PrefixParams | None = Field(default=None, description="Prefix-tuning parameters.")
    prompt: PromptParams | None = Field(default=None, description="Prompt-tuning parameters.")
    ia3: IA3Params | None = Field(default=None, description="(IA)³ parameters.")
    adalora: AdaLoRAParams | None = Field(default=None, description="AdaLoRA budget schedule.")
    freeze: FreezeSpec | None = Field(default=None, description="Train only part of the network (method `full` only).")

    rules: ClassVar[tuple[Rule, ...]] = (
        _method_params_only_for(("qlora",), "quantization"),
        _method_params_only_for(("prefix",), "prefix"),
        _method_params_only_for(("prompt",), "prompt"),
        _method_params_only_for(("ia3",), "ia3"),
        _method_params_only_for(("adalora",), "adalora"),
        _method_params_only_for(("full",), "freeze"),
        _method_params_only_for(("lora", "qlora", "adalora"), "lora"),
        Rule(
            cel="self.type != 'adalora' || !has(self.lora) || !has(self.lora.r)",
            message=(
                "spec.method.lora.r is not used by adalora: set its ranks in spec.method.adalora.initR and targetR"
            ),
            check=lambda m: m.type != "adalora" or m.lora is None or m.lora.r is None,
            field=".lora.r",
        ),
        Rule(
            cel="self.type != 'adalora' || !has(self.lora) || !has(self.lora.useRslora) || !self.lora.useRslora",
            message="spec.method.lora.useRslora is not supported by adalora (it scales by alpha / current rank)",
            check=lambda m: m.type != "adalora" or m.lora is None or not m.lora.use_rslora,
            field=".lora.useRslora",
        ),
        Rule(
            cel="self.type != 'adalora' || !has(self.lora) || !has(self.lora.useDora) || !self.lora.useDora",
            message="spec.method.lora.useDora is not supported by adalora",
            check=lambda m: m.type != "adalora" or m.lora is None or not m.lora.use_dora,
            field=".lora.useDora",
        ),
    )


# --------------------------------------------------------------------------------------------------
# spec.data
# --------------------------------------------------------------------------------------------------


class DataSource(SpecModel):
    """A dataset file or directory of files."""

    uri: DataUri = Field(
        description=(
            "File or directory: a local path (relative paths resolve against the manifest's directory "
            "in `finetune run`), `file://`, `s3://`, `gs://` or `az://`."
        ),
    )
    file_type: Literal["auto", "jsonl", "json", "parquet", "csv"] = Field(
        default="auto", description="File type; `auto` decides by file extension."
    )
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many records (the first ones).")


# spec.model.mineTokens.corpus is a DataSource, defined after spec.model: resolved now that it exists.
MineTokensSpec.model_rebuild()
ModelSpec.model_rebuild()


class ColumnMapping(SpecModel):
    """Names of the dataset columns each format reads."""

    prompt: str = Field(default="prompt", max_length=256, description="Prompt (promptCompletion, rl).")
    completion: str = Field(default="completion", max_length=256, description="Completion (promptCompletion).")
    messages: str = Field(
        default="messages",
        max_length=256,
        description="List of {role, content} messages (chat).",
    )
    text: str = Field(default="text", max_length=256, description="Raw text (text, classification).")
    label: str = Field(default="label", max_length=256, description="Class label (classification).")
    question: str = Field(default="question", max_length=256, description="Question (qa).")
    context: str = Field(default="context", max_length=256, description="Context passage (qa).")
    answers: str = Field(
        default="answers",
        max_length=256,
        description="Answers as {text: [...], answer_start: [...]} (qa).",
    )
    chosen: str = Field(default="chosen", max_length=256, description="Preferred response (preference).")
    rejected: str = Field(default="rejected", max_length=256, description="Dispreferred response (preference).")


#: The data formats augmentation refuses: a qa record's answer is a span of its context (offsets that
#: edits would break), a preference record's pair is judged as written (edits could flip the judgement).
UNAUGMENTED_FORMATS = ("qa", "preference")


class EDAOperation(SpecModel):
    """One operation of Easy Data Augmentation (Wei & Zou, 2019), on the words of a record's text."""

    alpha: float = Field(
        default=0.1,
        gt=0,
        le=0.5,
        description=(
            "How much of the text changes: synonymReplacement, randomInsertion and randomSwap make "
            "max(1, alpha x words) changes; randomDeletion drops each word with probability alpha (one "
            "word is always kept)."
        ),
    )
    copies: int = Field(default=1, ge=1, le=16, description="Augmented copies of each training record.")


class BackTranslationSpec(SpecModel):
    """Back-translation: the text translated by one seq2seq model and back by another."""

    forward: ModelUri = Field(
        description=(
            "The seq2seq translation model (e.g. English to German) the text is translated with, "
            "loaded as spec.model.uri is: a Hub id, s3://, gs://, az://, file://, pkg:// or a path."
        ),
    )
    backward: ModelUri = Field(description="The seq2seq model translating back into the data's language.")
    copies: int = Field(
        default=1,
        ge=1,
        le=8,
        description=(
            "Augmented copies of each training record: one is the greedy translation, more are sampled "
            "(seeded by spec.training.seed)."
        ),
    )
    max_new_tokens: int = Field(default=256, ge=8, le=4096, description="Longest translation, in tokens.")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Texts translated at a time.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=f"!self.forward.startsWith('{JOB_URI_SCHEME}://') && !self.backward.startsWith('{JOB_URI_SCHEME}://')",
            message=(
                "spec.data.augmentation.backTranslation: forward and backward cannot be ftj:// (only "
                "spec.model takes another job's output)"
            ),
            check=lambda m: (
                not (m.forward.startswith(f"{JOB_URI_SCHEME}://") or m.backward.startswith(f"{JOB_URI_SCHEME}://"))
            ),
            field=".forward",
        ),
    )


class AugmentationSpec(SpecModel):
    """Augmented copies of the training records (never of eval or general-eval data), made before
    tokenization and deterministic from spec.training.seed."""

    synonym_replacement: EDAOperation | None = Field(
        default=None, description="Replace words with WordNet synonyms (English; stop words are kept)."
    )
    random_insertion: EDAOperation | None = Field(
        default=None, description="Insert a WordNet synonym of a word of the text at a random place."
    )
    random_swap: EDAOperation | None = Field(default=None, description="Swap two random words.")
    random_deletion: EDAOperation | None = Field(default=None, description="Delete random words.")
    back_translation: BackTranslationSpec | None = Field(
        default=None, description="Translate the text into another language and back."
    )

    @property
    def copies(self) -> int:
        """Augmented records made of each training record."""
        ops = (self.synonym_replacement, self.random_insertion, self.random_swap, self.random_deletion)
        return sum(op.copies for op in ops if op is not None) + (
            self.back_translation.copies if self.back_translation is not None else 0
        )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "has(self.synonymReplacement) || has(self.randomInsertion) || has(self.randomSwap) || "
                "has(self.randomDeletion) || has(self.backTranslation)"
            ),
            message=(
                "spec.data.augmentation needs at least one of synonymReplacement, randomInsertion, randomSwap, "
                "randomDeletion and backTranslation"
            ),
            check=lambda m: m.copies > 0,
        ),
    )


class DataSpec(SpecModel):
    """Training and evaluation data, and how it is turned into token sequences."""

    train: DataSource = Field(description="Training data.")
    eval: DataSource | None = Field(default=None, description="Evaluation data (held out).")
    eval_split: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="Fraction of the training data held out for evaluation when `eval` is not given.",
    )
    format: DataFormat = Field(
        default="promptCompletion",
        description=(
            "Record format: `promptCompletion`, `chat` (multi-turn messages, rendered with the chat "
            "template), `text` (raw text, packed into blocks), `classification`, `qa` or `preference` "
            "(prompt, chosen, rejected)."
        ),
    )
    columns: ColumnMapping = Field(
        default_factory=ColumnMapping, description="Column names, when they differ from the defaults."
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=65536,
        description="System message prepended to chat conversations that have none.",
    )
    max_seq_length: int = Field(
        default=1024, ge=16, le=1048576, description="Longest token sequence; longer ones are truncated."
    )
    packing: bool = Field(
        default=False,
        description=(
            "Pack several samples into each sequence of maxSeqLength tokens; attention does not cross "
            "sample boundaries."
        ),
    )
    completion_only_loss: bool | None = Field(
        default=None,
        description=(
            "Compute the loss only on completion / assistant tokens, not on prompts (formats "
            "`promptCompletion` and `chat`, the ones with prompts; default true)."
        ),
    )
    augmentation: AugmentationSpec | None = Field(
        default=None,
        description=(
            "Augmented copies of the training records (never of eval data): each record trains as written "
            "and as its copies. What is changed is the input the model reads, never the target it learns to "
            "write: `promptCompletion` and `rl` prompts, `chat` user messages, `classification` text (the "
            "label stays), `text` the text. Formats `qa` (answers are spans of the context) and "
            "`preference` (a judged pair) are refused."
        ),
    )

    @property
    def prompt_loss_masked(self) -> bool:
        """Whether prompt tokens take no loss (``completionOnlyLoss``, true unless set false)."""
        return self.completion_only_loss is not False

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.systemPrompt) || self.format == 'chat'",
            message="spec.data.systemPrompt is only used by spec.data.format chat (it opens conversations)",
            check=lambda m: m.system_prompt is None or m.format == "chat",
            field=".systemPrompt",
        ),
        Rule(
            cel="!has(self.completionOnlyLoss) || self.format in ['promptCompletion', 'chat']",
            message=(
                "spec.data.completionOnlyLoss is only used by spec.data.format promptCompletion and chat "
                "(the formats with prompts to leave out of the loss)"
            ),
            check=lambda m: m.completion_only_loss is None or m.format in ("promptCompletion", "chat"),
            field=".completionOnlyLoss",
        ),
        Rule(
            cel="!(has(self.eval) && self.evalSplit > 0.0)",
            message="spec.data.eval and spec.data.evalSplit are mutually exclusive",
            check=lambda m: not (m.eval is not None and m.eval_split > 0),
            field=".evalSplit",
        ),
        Rule(
            cel="!has(self.augmentation) || !(self.format in ["
            + ", ".join(f"'{f}'" for f in UNAUGMENTED_FORMATS)
            + "])",
            message=(
                "spec.data.augmentation is not supported for spec.data.format qa (edits would break the "
                "answers' spans of the context) nor preference (edits could change which response is better)"
            ),
            check=lambda m: m.augmentation is None or m.format not in UNAUGMENTED_FORMATS,
            field=".augmentation",
        ),
    )


# --------------------------------------------------------------------------------------------------
# spec.training
# --------------------------------------------------------------------------------------------------


class GenerationEvalSpec(SpecModel):
    """How the model generates for the generation metrics (``bleu``, ``rouge``): greedily, after each
    eval record's prompt, in batches of perDeviceBatchSize (left-padded), each rank its share."""

    max_new_tokens: int = Field(
        default=64, ge=1, le=4096, description="Most tokens generated after each prompt (stops at end of turn/text)."
    )
    samples: int = Field(
        default=256,
        ge=1,
        le=100000,
        description=(
            "Eval records generated for and scored at each evaluation: the first N of the eval data (all when "
            "it has fewer). The last evaluation's prompts, references and generations are samples.jsonl in the outputs."
        ),
    )


class EvaluationSpec(SpecModel):
    """Periodic evaluation on the eval data."""

    every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N optimizer steps (and at the end)."
    )
    metrics: list[EvalMetric] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description=(
            f"Metrics to report, among those the task produces: {_metrics_of_trained_tasks(lambda r: r.metrics)} "
            "(the tasks this release trains). `bleu` (sacreBLEU corpus BLEU, 0-100) and `rouge` (ROUGE-1/2/L "
            "F-measure, 0-1; rougeL is the one early stopping watches) score text the model generates after "
            "each eval prompt against the record's own completion: formats promptCompletion and chat only, "
            "reported only when listed. Default: every other metric the task produces."
        ),
    )
    generation: GenerationEvalSpec | None = Field(
        default=None,
        description="How the `bleu` and `rouge` metrics generate (one of them must be in metrics). Default: as below.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.generation) || (has(self.metrics) && self.metrics.exists(m, m in ["
            + ", ".join(f"'{m}'" for m in GENERATION_METRICS)
            + "]))",
            message=(
                "spec.training.evaluation.generation configures the generation metrics: "
                "spec.training.evaluation.metrics must name bleu or rouge"
            ),
            check=lambda m: m.generation is None or any(x in GENERATION_METRICS for x in m.metrics or ()),
            field=".generation",
        ),
    )


class EarlyStoppingSpec(SpecModel):
    """Stop when an evaluation metric stops improving."""

    metric: EarlyStoppingMetric = Field(
        default="evalLoss",
        description=(
            f"Metric watched, one the task produces ({_metrics_of_trained_tasks(lambda r: r.early_stopping_metrics)}) "
            "and, when spec.training.evaluation.metrics is set, one of them (`evalLoss` is `loss`)."
        ),
    )
    mode: Literal["min", "max"] | None = Field(
        default=None,
        description=(
            "Whether lower (`min`) or higher (`max`) values are better. Default: `min` for `evalLoss` and "
            "`perplexity`, `max` for `accuracy`, `f1`, `exactMatch` and `agreement`."
        ),
    )
    patience: int = Field(default=3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    threshold: float = Field(default=0.0, ge=0, description="Smallest change that counts as an improvement.")

    @property
    def greater_is_better(self) -> bool:
        """Whether a higher value of the metric is an improvement (``mode``, or the metric's own sense)."""
        return self.mode == "max" if self.mode is not None else self.metric in HIGHER_IS_BETTER


class EWCSpec(SpecModel):
    """Elastic weight consolidation: penalize moving the trained parameters away from their values
    before training, weighted by how much the model's loss on general data depends on each.

    Before training, the diagonal of the *empirical* Fisher information of the trainable parameters
    is estimated on `fisherData`: the mean over `fisherSamples` samples of the squared gradient of
    each sample's LM loss (on the data's own labels, not on tokens sampled from the model). Training
    then minimizes loss + strength / 2 * sum(F * (theta - theta0)^2), theta0 the trainable parameters'
    values before the first step. Under a PEFT method theta is what is trained: with LoRA the adapter
    weights, whose theta0 is their initialization (B = 0), so the penalty pulls the adapter's update
    toward zero, weighted by the Fisher. The Fisher and theta0 are kept beside the checkpoints
    (`<checkpoint>/ewc-anchor/`): a resumed run reads them instead of estimating again. Not combined
    with DeepSpeed (refused)."""

    strength: float = Field(
        gt=0,
        le=1e9,
        description=(
            "EWC λ: weight of the penalty λ/2 · Σ F·(θ - θ₀)² added to the loss (the term added is "
            "logged as `ewc_penalty` with the loss, which includes it)."
        ),
    )
    fisher_samples: int = Field(
        default=256,
        ge=1,
        le=1000000,
        description=(
            "Samples (records) the Fisher information is averaged over: that many records of fisherData "
            "chosen by the seed, or all of them when it has fewer. Under DDP every rank takes its share "
            "and the sums are all-reduced: the same Fisher on every rank."
        ),
    )
    fisher_data: DataSource | None = Field(
        default=None,
        description=(
            "Data for the Fisher estimate, read as plain text (records with a `text` column, loss on "
            "every token). Default: the replay data (spec.training.forgetting.replay.source), else the "
            "general-eval data (generalEval), else the training data (as trained: its format and labels)."
        ),
    )


class ReplaySpec(SpecModel):
    """Experience replay: mix general data into training to limit forgetting."""

    source: DataSource = Field(
        description=(
            "General-domain data to replay: plain text (records with a `text` column), tokenized as the "
            "`text` format is (EOS appended, loss on every token; packed into blocks of maxSeqLength when "
            "spec.data.packing, else each record cut to maxSeqLength)."
        )
    )
    ratio: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description=(
            "Fraction of the training rows that are replay rows. Each epoch holds every training row and "
            "round(ratio / (1 - ratio) · training rows) replay rows (the replay data taken in shuffled "
            "passes), shuffled together: the epoch's replay fraction is ratio up to that rounding, and "
            "each batch's is ratio on average (its count follows the hypergeometric law). The order is "
            "a function of the seed and the epoch only, so a resumed run trains on exactly the rows an "
            "uninterrupted one does; the steps of an epoch count the replay rows."
        ),
    )


class ForgettingSpec(SpecModel):
    """Controls against catastrophic forgetting of the base model's abilities, and its measure."""

    ewc: EWCSpec | None = Field(
        default=None,
        description=(
            "Elastic weight consolidation (spec.task.type sft and pretrain; not with spec.distributed.deepspeed)."
        ),
    )
    replay: ReplaySpec | None = Field(
        default=None, description="Replay of general data mixed into training (spec.task.type sft and pretrain)."
    )
    general_eval: DataSource | None = Field(
        default=None,
        description=(
            "General text whose perplexity is reported before and after training (the run summary, "
            "status.progress.generalPerplexity and the finetune_general_perplexity gauge)."
        ),
    )


class DivergenceSpec(SpecModel):
    """When the training loss counts as diverged, and what a rollback changes."""

    loss_factor: float | None = Field(
        default=None,
        gt=1,
        le=1e6,
        description=(
            "Diverged when the mean training loss of a logging window (logEverySteps steps, averaged over "
            "every rank) is above this multiple of the lowest window mean so far, for consecutiveLogs windows "
            "in a row. Unset: only a non-finite loss counts."
        ),
    )
    consecutive_logs: int = Field(
        default=3, ge=1, le=1000, description="Logging windows in a row above lossFactor that make a divergence."
    )
    learning_rate_scale: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "Each rollback multiplies the learning rate by this (1: unchanged): after k rollbacks, by its k-th power."
        ),
    )
    max_rollbacks: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Rollbacks allowed; a divergence after the last fails the job (reason Diverged).",
    )


class TrainingSpec(SpecModel):
    """Optimization hyperparameters."""

    epochs: float | None = Field(
        default=None, gt=0, le=10000, description="Passes over the training data (xor maxSteps)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=100000000, description="Optimizer steps to train (xor epochs)."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warm-up steps (xor warmupRatio).")
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1, description="Warm-up as a fraction of all steps (xor warmupSteps)."
    )
    per_device_batch_size: int = Field(default=4, ge=1, le=65536, description="Sequences per device per forward pass.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=65536, description="Forward passes accumulated per optimizer step."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )
    precision: Precision = Field(
        default="auto",
        description="Mixed-precision mode. `auto`: bf16 where the accelerator supports it, else fp32.",
    )
    weight_decay: float = Field(default=0.0, ge=0, le=10, description="Decoupled weight decay.")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Override the model's dropout probabilities.")
    max_grad_norm: float = Field(
        default=1.0, ge=0, le=1e6, description="Clip the global gradient norm (0 disables clipping)."
    )
    optimizer: Literal["adamw", "adamw8bit", "pagedAdamw8bit", "pagedAdamw32bit", "adafactor", "sgd"] = Field(
        default="adamw", description="Optimizer. Paged and 8-bit variants need CUDA."
    )
    seed: int = Field(default=42, ge=0, le=4294967295, description="Seed of every random generator.")
    log_every_steps: int = Field(default=10, ge=1, le=1000000, description="Report loss and throughput every N steps.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Periodic evaluation.")
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when the watched metric stops improving; the best model is kept."
    )
    forgetting: ForgettingSpec | None = Field(
        default=None,
        description="Catastrophic forgetting: its measure (generalEval) and controls against it (EWC, replay).",
    )
    on_divergence: Literal["fail", "rollback"] = Field(
        default="fail",
        description=(
            "What a diverged loss (non-finite, or above divergence.lossFactor) does. `fail`: the job fails "
            "(reason NonFiniteLoss or Diverged), the last good checkpoint kept. `rollback`: the checkpoints "
            "written since the divergence began are removed and the gang restarts from the newest one before "
            "it, with the learning rate scaled by divergence.learningRateScale, at most divergence.maxRollbacks "
            "times (each listed in status.rollbacks); needs spec.checkpoint.uri."
        ),
    )
    divergence: DivergenceSpec = Field(
        default_factory=DivergenceSpec, description="What counts as a divergence, and what a rollback changes."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.epochs) != has(self.maxSteps)",
            message="exactly one of spec.training.epochs or spec.training.maxSteps must be set",
            check=lambda m: (m.epochs is None) != (m.max_steps is None),
            field=".maxSteps",
        ),
        Rule(
            cel="!(has(self.warmupSteps) && has(self.warmupRatio))",
            message="spec.training.warmupSteps and spec.training.warmupRatio are mutually exclusive",
            check=lambda m: not (m.warmup_steps is not None and m.warmup_ratio is not None),
            field=".warmupRatio",
        ),
        Rule(
            cel="!has(self.earlyStopping) || has(self.evaluation.everySteps)",
            message="spec.training.earlyStopping needs spec.training.evaluation.everySteps",
            check=lambda m: m.early_stopping is None or m.evaluation.every_steps is not None,
            field=".earlyStopping",
        ),
        Rule(
            cel="!has(self.earlyStopping) || !has(self.evaluation) || !has(self.evaluation.metrics) "
            "|| (self.earlyStopping.metric == 'evalLoss' ? 'loss' : self.earlyStopping.metric) "
            "in self.evaluation.metrics",
            message=(
                "spec.training.earlyStopping.metric must be one of spec.training.evaluation.metrics "
                "(evalLoss watches loss): only those are reported"
            ),
            check=lambda m: (
                m.early_stopping is None
                or m.evaluation.metrics is None
                or eval_metric_name(m.early_stopping.metric) in m.evaluation.metrics
            ),
            field=".earlyStopping.metric",
        ),
        Rule(
            cel="!has(self.earlyStopping) || !(self.earlyStopping.metric in ["
            + ", ".join(f"'{m}'" for m in GENERATION_METRICS)
            + "]) || (has(self.evaluation) && has(self.evaluation.metrics) "
            "&& self.earlyStopping.metric in self.evaluation.metrics)",
            message=(
                "spec.training.earlyStopping.metric bleu or rouge must be listed in spec.training.evaluation.metrics: "
                "generation metrics are computed only when asked for"
            ),
            check=lambda m: (
                m.early_stopping is None
                or m.early_stopping.metric not in GENERATION_METRICS
                or (m.evaluation.metrics is not None and m.early_stopping.metric in m.evaluation.metrics)
            ),
            field=".earlyStopping.metric",
        ),
    )


# --------------------------------------------------------------------------------------------------
# spec.distributed
# --------------------------------------------------------------------------------------------------


class ConfigMapKeyRef(SpecModel):
    """A key of a ConfigMap in the job's namespace."""

    name: KubeName = Field(description="ConfigMap name.")
    key: str = Field(max_length=253, pattern=OBJECT_KEY_PATTERN, description="Key within the ConfigMap.")


class DeepSpeedSpec(SpecModel):
    """DeepSpeed ZeRO: shard optimizer state, gradients and parameters across ranks."""

    zero_stage: int = Field(
        default=2, ge=0, le=3, description="ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none", description="Keep optimizer state in host memory."
    )
    offload_params: Literal["none", "cpu"] = Field(
        default="none", description="Keep parameters in host memory (ZeRO-3 only)."
    )
    config: ConfigMapKeyRef | None = Field(
        default=None,
        description=(
            "A complete DeepSpeed JSON config to use instead of the generated one (`auto` values are "
            "filled from the spec)."
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.offloadParams == 'none' || self.zeroStage == 3",
            message="spec.distributed.deepspeed.offloadParams needs zeroStage 3",
            check=lambda m: m.offload_params == "none" or m.zero_stage == 3,
            field=".offloadParams",
        ),
        Rule(
            cel="self.offloadOptimizer == 'none' || self.zeroStage >= 1",
            message="spec.distributed.deepspeed.offloadOptimizer needs zeroStage 1 or higher",
            check=lambda m: m.offload_optimizer == "none" or m.zero_stage >= 1,
            field=".offloadOptimizer",
        ),
    )


PROCS_PER_NODE_MESSAGE = "spec.distributed.procsPerNode must be 'auto' or an integer from 1 to 1024"


def _check_procs_per_node(value: Any) -> int | Literal["auto"]:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024):
        return value  # type: ignore[no-any-return]
    raise PydanticCustomError("procs_per_node", "must be 'auto' or an integer from 1 to 1024")


#: ``auto`` or a number of processes; one message for every way it can be wrong.
ProcsPerNode = Annotated[
    int | Literal["auto"],
    PlainValidator(_check_procs_per_node, json_schema_input_type=int | str),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["auto"]}]}),
]


class DistributedSpec(SpecModel):
    """How training is spread over nodes and processes."""

    nodes: int = Field(default=1, ge=1, le=4096, description="Number of nodes (pods) in the gang.")
    procs_per_node: ProcsPerNode = Field(
        default="auto",
        description=(
            "Training processes per node; `auto` = resources.gpusPerNode (1 on CPU). With GPUs, at most "
            "gpusPerNode: every process drives its own GPU."
        ),
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="Collective backend; `auto` = nccl with GPUs, gloo without."
    )
    rendezvous_port: int = Field(
        default=29500, ge=1024, le=65535, description="Port of the torchrun rendezvous on node 0."
    )
    deepspeed: DeepSpeedSpec | None = Field(default=None, description="Enable DeepSpeed ZeRO.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="type(self.procsPerNode) == string ? self.procsPerNode == 'auto' : "
            "(self.procsPerNode >= 1 && self.procsPerNode <= 1024)",
            message=PROCS_PER_NODE_MESSAGE,
            check=lambda m: m.procs_per_node == "auto" or 1 <= int(m.procs_per_node) <= 1024,
            field=".procsPerNode",
        ),
    )


# --------------------------------------------------------------------------------------------------
# spec.resources
# --------------------------------------------------------------------------------------------------


class Toleration(SpecModel):
    """A pod toleration, as in the Kubernetes core API (and checked by its rules, here at admission)."""

    key: str | None = Field(default=None, max_length=317, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Match operator.")
    value: str | None = Field(default=None, max_length=63, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=f"!has(self.key) || self.key == '' || ({_cel_qualified_name('self.key')})",
            message=f"spec.resources.tolerations[].key must be a taint key: {QUALIFIED_NAME_HINT}",
            check=lambda m: not m.key or is_qualified_name(m.key),
            field=".key",
        ),
        Rule(
            cel="(has(self.key) && self.key != '') || self.operator == 'Exists'",
            message="spec.resources.tolerations[].operator must be Exists when key is empty (it tolerates every taint)",
            check=lambda m: bool(m.key) or m.operator == "Exists",
            field=".operator",
        ),
        Rule(
            cel="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="spec.resources.tolerations[].value must be empty when operator is Exists",
            check=lambda m: m.operator != "Exists" or not m.value,
            field=".value",
        ),
        Rule(
            cel=f"!has(self.value) || self.value.matches(r'{LABEL_VALUE_PATTERN}')",
            message=f"spec.resources.tolerations[].value must be a label value: {LABEL_VALUE_HINT}",
            check=lambda m: m.value is None or is_label_value(m.value),
            field=".value",
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="spec.resources.tolerations[].tolerationSeconds needs effect NoExecute",
            check=lambda m: m.toleration_seconds is None or m.effect == "NoExecute",
            field=".tolerationSeconds",
        ),
    )


class LocalObjectReference(SpecModel):
    """A reference to an object in the same namespace."""

    name: KubeName = Field(description="Name of the object.")


class SecretKeySelector(SpecModel):
    """A key of a Secret in the job's namespace."""

    name: KubeName = Field(description="Secret name.")
    key: str = Field(max_length=253, pattern=OBJECT_KEY_PATTERN, description="Key within the Secret.")


class EnvVarSource(SpecModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: SecretKeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: ConfigMapKeyRef | None = Field(default=None, description="A key of a ConfigMap.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.secretKeyRef) != has(self.configMapKeyRef)",
            message="spec.resources.env[].valueFrom needs exactly one of secretKeyRef or configMapKeyRef",
            check=lambda m: (m.secret_key_ref is None) != (m.config_map_key_ref is None),
        ),
    )


class EnvVar(SpecModel):
    """An extra environment variable for the trainer container."""

    name: str = Field(max_length=256, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(default=None, description="Value read from a Secret or ConfigMap.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            message="spec.resources.env[].value and valueFrom are mutually exclusive",
            check=lambda m: not (m.value is not None and m.value_from is not None),
            field=".valueFrom",
        ),
        Rule(
            cel=f"!self.name.startsWith('{TEST_HOOK_ENV_PREFIX}')",
            message=f"spec.resources.env[].name must not start with {TEST_HOOK_ENV_PREFIX}: reserved for tests",
            check=lambda m: not m.name.startswith(TEST_HOOK_ENV_PREFIX),
            field=".name",
        ),
    )


def _label_map_rules(field: str) -> tuple[Rule, ...]:
    """Keys and values of a map that becomes Kubernetes labels (or a node selector) of the pods."""
    return (
        Rule(
            cel=f"!has(self.{field}) || self.{field}.all(k, {_cel_qualified_name('k')})",
            message=f"spec.resources.{field} keys must be label keys: {QUALIFIED_NAME_HINT}",
            check=lambda m: all(is_qualified_name(k) for k in getattr(m, _snake(field))),
            field=f".{field}",
        ),
        Rule(
            cel=f"!has(self.{field}) || self.{field}.all(k, self.{field}[k].matches(r'{LABEL_VALUE_PATTERN}'))",
            message=f"spec.resources.{field} values must be label values: {LABEL_VALUE_HINT}",
            check=lambda m: all(re.fullmatch(LABEL_VALUE_PATTERN, v) for v in getattr(m, _snake(field)).values()),
            field=f".{field}",
        ),
    )


class ResourcesSpec(SpecModel):
    """Compute resources and scheduling of each node's pod."""

    gpus_per_node: int = Field(default=1, ge=0, le=64, description="Accelerators requested per node.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=EXTENDED_RESOURCE_PATTERN,
        description="Extended resource name of the accelerator.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per node, e.g. `8`.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per node, e.g. `64Gi`.")
    shared_memory: Quantity = Field(
        default="2Gi",
        description="Size of the memory-backed /dev/shm volume used by the collective backend and loaders.",
    )
    gpu_memory: Quantity | None = Field(
        default=None,
        description=(
            "Memory of each GPU, e.g. `80Gi`: the memory-fit estimate checks the job's peak per GPU against it "
            "(without it, the nvidia.com/gpu.memory value of nodeSelector, if any)."
        ),
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels the pods must match (label keys and values).",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Taints the pods tolerate.")
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description=(
            "Pod affinity, in the Kubernetes core API's form; passed verbatim to the pod template, "
            "where the API server validates it (its schema is too deep to repeat here)."
        ),
    )
    priority_class_name: KubeName | None = Field(default=None, description="PriorityClass of the pods.")
    image: str | None = Field(
        default=None,
        max_length=1024,
        pattern=NO_WHITESPACE_PATTERN,
        description="Trainer image override. Default: the image the operator was configured with.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the image."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        description="Extra environment variables of the trainer and preflight pods.",
    )
    pod_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra labels on the trainer and preflight pods (the operator's own finetune.io/* labels win).",
    )
    pod_annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra annotations on the trainer and preflight pods (e.g. for a service mesh or log shipper).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        _cel_positive_quantity("cpu"),
        _cel_positive_quantity("memory"),
        _cel_positive_quantity("sharedMemory"),
        _cel_positive_quantity("gpuMemory"),
        *(_label_map_rules("nodeSelector") + _label_map_rules("podLabels")),
        Rule(
            cel=f"!has(self.podAnnotations) || self.podAnnotations.all(k, {_cel_qualified_name('k')})",
            message=f"spec.resources.podAnnotations keys must be annotation keys: {QUALIFIED_NAME_HINT}",
            check=lambda m: all(is_qualified_name(k) for k in m.pod_annotations),
            field=".podAnnotations",
        ),
    )

    @property
    def gpu_memory_bytes(self) -> int | None:
        """The memory of each GPU in bytes: ``gpuMemory``, else the ``nvidia.com/gpu.memory`` value (MiB, as
        NVIDIA GPU feature discovery labels nodes) the node selector pins; None when neither says."""
        if self.gpu_memory is not None:
            return quantity_bytes(self.gpu_memory)
        label = self.node_selector.get(GPU_MEMORY_LABEL)
        return int(label) * 1024**2 if label is not None and label.isascii() and label.isdigit() else None


# --------------------------------------------------------------------------------------------------
# spec.checkpoint, spec.output, spec.metrics, spec.runPolicy
# --------------------------------------------------------------------------------------------------


#: ``spec.checkpoint.uri`` schemes by store (the rest: S3, or a filesystem).
GCS_URI_SCHEMES = ("gs", "gcs")
AZURE_URI_SCHEMES = ("az", "abfs", "abfss")


def _cel_scheme_in(schemes: tuple[str, ...]) -> str:
    return "(" + " || ".join(f"self.uri.startsWith('{s}://')" for s in schemes) + ")"


def uri_scheme(uri: str | None) -> str:
    """The scheme of a URI (``s3``, ``gs``, ...), ``""`` for a path or no URI."""
    return uri.split("://", 1)[0] if uri and "://" in uri else ""


class CredentialsRef(SpecModel):
    """A Secret holding object-storage credentials, given to the trainer as each store's SDK reads them.

    The Secret serves one store, the one of ``spec.checkpoint.uri`` (and the model, data and output
    URIs on that store): S3 (the default) by an access key, Google Cloud Storage by a service-account
    key file (``serviceAccountKeyKey``), Azure Blob Storage by a connection string
    (``connectionStringKey``)."""

    name: KubeName = Field(description="Secret name, in the job's namespace.")
    access_key_id_key: str | None = Field(
        default=None,
        max_length=253,
        description="S3: key holding the access key id (`AWS_ACCESS_KEY_ID` in the pod). Default `AWS_ACCESS_KEY_ID`.",
    )
    secret_access_key_key: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "S3: key holding the secret access key (`AWS_SECRET_ACCESS_KEY` in the pod). "
            "Default `AWS_SECRET_ACCESS_KEY`."
        ),
    )
    session_token_key: str | None = Field(
        default=None, max_length=253, description="S3: key holding a session token, if any (`AWS_SESSION_TOKEN`)."
    )
    service_account_key_key: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "Google Cloud Storage (`gs://`): key holding a service-account key (JSON), mounted read-only in "
            "the pod where `GOOGLE_APPLICATION_CREDENTIALS` names it. Without credentials, gs:// uses the "
            "pod's own Google identity (Workload Identity)."
        ),
    )
    connection_string_key: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "Azure Blob Storage (`az://`): key holding the storage account's connection string "
            "(`AZURE_STORAGE_CONNECTION_STRING` in the pod): the account with its key or a SAS token, and "
            "its endpoint (`BlobEndpoint=` for Azurite or a sovereign cloud)."
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "(has(self.accessKeyIdKey) || has(self.secretAccessKeyKey) || has(self.sessionTokenKey) ? 1 : 0)"
                " + (has(self.serviceAccountKeyKey) ? 1 : 0) + (has(self.connectionStringKey) ? 1 : 0) <= 1"
            ),
            message=(
                "spec.checkpoint.credentials names the keys of one store: S3 (accessKeyIdKey, "
                "secretAccessKeyKey, sessionTokenKey), Google Cloud Storage (serviceAccountKeyKey) or Azure "
                "(connectionStringKey)"
            ),
            check=lambda m: (
                int(any(k is not None for k in (m.access_key_id_key, m.secret_access_key_key, m.session_token_key)))
                + int(m.service_account_key_key is not None)
                + int(m.connection_string_key is not None)
                <= 1
            ),
        ),
    )


class CheckpointSpec(SpecModel):
    """Durable checkpoints and automatic resume."""

    uri: StorageUri | None = Field(
        default=None,
        description=(
            "Checkpoint root (`s3://`, `gs://`, `az://`, `file://` or a mounted path); checkpoints go "
            "to `<uri>/<namespace>/<job>/checkpoint-<step>/`. Without it there is no resume."
        ),
    )
    every_steps: int | None = Field(default=None, ge=1, description="Checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(
        default=30, gt=0, le=100000, description="Checkpoint at least this often, in minutes."
    )
    keep_last: int = Field(default=3, ge=1, le=1000, description="Committed checkpoints kept (plus the best).")
    keep_best: bool = Field(default=True, description="Also keep the checkpoint with the best eval metric.")
    save_on_preemption: bool = Field(
        default=True, description="On SIGTERM, save full state within the grace period, then exit."
    )
    grace_period_seconds: int = Field(
        default=120, ge=5, le=86400, description="Time given to the save on preemption (pod grace period)."
    )
    resume: Literal["auto", "never"] = Field(
        default="auto",
        description=(
            "`auto`: continue from the newest committed checkpoint, if any (one written for a different "
            "model, task, method, data, training or distributed spec fails the job). `never`: start from "
            "scratch; this job's earlier checkpoints are deleted."
        ),
    )
    credentials: CredentialsRef | None = Field(default=None, description="Secret with object-storage credentials.")
    endpoint_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=ENDPOINT_URL_PATTERN,
        description=(
            "Endpoint of the store of `uri`: an S3-compatible store (MinIO, Ceph, …; `AWS_ENDPOINT_URL` in "
            "the pod), also without a `uri` or with a local one; for `gs://` a GCS-compatible server (an "
            "emulator; `STORAGE_EMULATOR_HOST`). Not for `az://`: its connection string names the endpoint."
        ),
    )
    region: str | None = Field(
        default=None, max_length=64, description="S3 region (`AWS_REGION`); not for `gs://` or `az://`."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.uri) || has(self.everySteps) || has(self.everyMinutes)",
            message="spec.checkpoint needs everySteps or everyMinutes when uri is set",
            check=lambda m: m.uri is None or m.every_steps is not None or m.every_minutes is not None,
            field=".everySteps",
        ),
        Rule(
            cel=(
                f"!has(self.uri) || !{_cel_scheme_in(GCS_URI_SCHEMES)} || !has(self.credentials)"
                " || has(self.credentials.serviceAccountKeyKey)"
            ),
            message=(
                "spec.checkpoint.credentials.serviceAccountKeyKey is required with credentials for a gs:// uri "
                "(the Secret's key holding a service-account key file)"
            ),
            check=lambda m: (
                uri_scheme(m.uri) not in GCS_URI_SCHEMES
                or m.credentials is None
                or m.credentials.service_account_key_key is not None
            ),
            field=".credentials.serviceAccountKeyKey",
        ),
        Rule(
            cel=(
                f"!has(self.uri) || !{_cel_scheme_in(AZURE_URI_SCHEMES)} || !has(self.credentials)"
                " || has(self.credentials.connectionStringKey)"
            ),
            message=(
                "spec.checkpoint.credentials.connectionStringKey is required with credentials for an az:// uri "
                "(the Secret's key holding the storage account's connection string)"
            ),
            check=lambda m: (
                uri_scheme(m.uri) not in AZURE_URI_SCHEMES
                or m.credentials is None
                or m.credentials.connection_string_key is not None
            ),
            field=".credentials.connectionStringKey",
        ),
        Rule(
            cel=(
                "!has(self.uri) || !self.uri.startsWith('s3://') || !has(self.credentials)"
                " || !(has(self.credentials.serviceAccountKeyKey) || has(self.credentials.connectionStringKey))"
            ),
            message=(
                "spec.checkpoint.credentials of an s3:// uri are an access key: serviceAccountKeyKey is for "
                "gs://, connectionStringKey for az://"
            ),
            check=lambda m: (
                uri_scheme(m.uri) != "s3"
                or m.credentials is None
                or (m.credentials.service_account_key_key is None and m.credentials.connection_string_key is None)
            ),
            field=".credentials",
        ),
        Rule(
            cel=f"!has(self.uri) || !{_cel_scheme_in(AZURE_URI_SCHEMES)} || !has(self.endpointUrl)",
            message=(
                "spec.checkpoint.endpointUrl is not used for an az:// uri: the connection string in "
                "credentials.connectionStringKey names the endpoint (BlobEndpoint=...)"
            ),
            check=lambda m: uri_scheme(m.uri) not in AZURE_URI_SCHEMES or m.endpoint_url is None,
            field=".endpointUrl",
        ),
        Rule(
            cel=(
                f"!has(self.uri) || !({_cel_scheme_in(GCS_URI_SCHEMES)} || {_cel_scheme_in(AZURE_URI_SCHEMES)})"
                " || !has(self.region)"
            ),
            message="spec.checkpoint.region is for S3 stores: a gs:// or az:// bucket has its own location",
            check=lambda m: uri_scheme(m.uri) not in (*GCS_URI_SCHEMES, *AZURE_URI_SCHEMES) or m.region is None,
            field=".region",
        ),
    )


class OutputSpec(SpecModel):
    """What the job leaves behind when it succeeds."""

    uri: StorageUri | None = Field(
        default=None,
        description="Where the result is written. Default: `<checkpoint.uri>/<namespace>/<job>/output`.",
    )
    save: Literal["auto", "adapter", "merged", "both"] = Field(
        default="auto",
        description=(
            "`adapter` (PEFT weights only), `merged` (adapter merged into the base model), or `both`. "
            "`auto`: adapter for PEFT methods, the full model for `full` (which saves the model itself "
            "and allows `auto` or `merged`). `prefix` and `prompt` cannot merge: `auto` or `adapter`."
        ),
    )


class MetricsSpec(SpecModel):
    """Prometheus metrics exported by every trainer rank."""

    enabled: bool = Field(default=True, description="Serve /metrics on every rank.")
    port: int = Field(
        default=9410,
        ge=1024,
        le=65535,
        description="Port of local rank 0 on every node; local rank r serves on port + r.",
    )


#: runPolicy.stallTimeoutSeconds when unset.
DEFAULT_STALL_TIMEOUT_SECONDS = 1800
#: A running job is stalled only once it has been quiet for this many of its own intervals between
#: progress reports (logEverySteps x its seconds per step, plus the status reporter's delay) too.
STALL_INTERVALS = 5
#: The status reporter's largest delay between a logged step and its status patch (seconds).
PROGRESS_REPORT_DELAY_SECONDS = 10
CONDITION_STALLED = "Stalled"
#: Condition of a job that takes a model from another FineTuneJob (``ftj://``), and its reasons.
CONDITION_DEPENDENCY_READY = "DependencyReady"
REASON_WAITING_FOR_JOB = "WaitingForJob"
REASON_DEPENDENCY_FAILED = "DependencyFailed"
REASON_STALLED = "Stalled"
#: Reason of a gang restarted because a node under it was deleted or went down (status.lastFailure).
REASON_NODE_LOST = "NodeLost"
#: Condition of a job submitted to Kueue (runPolicy.queueName): True while Kueue holds its gang, with
#: reason Queued (waiting for quota) or Preempted (evicted; its pods are saving and stopping).
CONDITION_QUEUED = "Queued"
REASON_QUEUED = "Queued"
REASON_PREEMPTED = "Preempted"


class RunPolicy(SpecModel):
    """Lifecycle: retries, deadline, stalls, clean-up and queueing."""

    backoff_limit: int = Field(
        default=3, ge=0, le=1000, description="Gang restarts after retriable failures before giving up."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it has run this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished FineTuneJob (and its children) after this long."
    )
    stall_timeout_seconds: int = Field(
        default=DEFAULT_STALL_TIMEOUT_SECONDS,
        ge=60,
        le=7 * 24 * 3600,
        description=(
            "A running job whose status.progress has not moved (no new step reported) for this long is "
            f"stalled: a rank stuck in a collective, a hung data loader. Counted from the current attempt's "
            f"first reported step (model download and start-up are never a stall), and never shorter than "
            f"{STALL_INTERVALS} times the job's own interval between progress reports (logEverySteps times "
            f"its seconds per step, plus {PROGRESS_REPORT_DELAY_SECONDS} s). An evaluation or checkpoint save "
            "longer than this also reads as a stall: set it above the longest one."
        ),
    )
    on_stall: Literal["restart", "fail", "none"] = Field(
        default="restart",
        description=(
            "What a stall does: `restart` the gang from the newest committed checkpoint (a restart with reason "
            "`Stalled`, counted against backoffLimit), `fail` the job (reason `Stalled`), or `none` (condition "
            "`Stalled` and a Warning event only)."
        ),
    )
    suspend: bool = Field(default=False, description="Hold the job without pods; set false to start.")
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=QUEUE_NAME_PATTERN,
        description=(
            "Kueue LocalQueue to submit the gang to (label `kueue.x-k8s.io/queue-name` on its Job). Kueue decides "
            "when it runs: while it waits, or after Kueue preempted it (its pods save their step on SIGTERM), "
            "the phase is Pending with condition `Queued` (reason `Queued` or `Preempted`, Kueue's message); "
            "readmitted, it resumes from the saved step. `suspend` then deactivates its Kueue Workload."
        ),
    )


# --------------------------------------------------------------------------------------------------
# spec.preflight
# --------------------------------------------------------------------------------------------------

#: Defaults of the preflight pod's resources (``spec.preflight.resources``) and deadline.
PREFLIGHT_CPU = "4"
PREFLIGHT_MEMORY = "8Gi"
PREFLIGHT_DEADLINE_SECONDS = 3600


def _preflight_used_only_by_auto(field: str, cel: str, check: Callable[[Any], bool], what: str) -> Rule:
    return Rule(
        cel=f"self.mode != 'skip' || {cel}",
        message=f"spec.preflight.{field} {what}: not with spec.preflight.mode skip, which runs no preflight",
        check=lambda m: m.mode != "skip" or check(m),
        field=f".{field}",
    )


class PreflightResources(SpecModel):
    """CPU and memory of the preflight pod, each its request and its limit."""

    cpu: Quantity = Field(
        default=PREFLIGHT_CPU,
        description="CPU request and limit of the preflight pod; the record checks and tokenization use them all.",
    )
    memory: Quantity = Field(default=PREFLIGHT_MEMORY, description="Memory request and limit of the preflight pod.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="type(self.cpu) != int || self.cpu > 0",
            message=f"spec.preflight.resources.cpu {QUANTITY_HINT}",
            check=lambda m: _is_quantity(m.cpu),
            field=".cpu",
        ),
        Rule(
            cel="type(self.memory) != int || self.memory > 0",
            message=f"spec.preflight.resources.memory {QUANTITY_HINT}",
            check=lambda m: _is_quantity(m.memory),
            field=".memory",
        ),
    )


class PreflightSpec(SpecModel):
    """The CPU-only check the operator runs before any GPU is held: every record checked, the tokenized
    cache built, statistics and the memory-fit estimate, written to status.preflight."""

    mode: Literal["auto", "skip"] = Field(
        default="auto",
        description=(
            "`auto`: before the training gang exists, a CPU-only preflight pod (the trainer image, the job's "
            "credentials) checks every record, builds the tokenized cache, probes write access to the checkpoint "
            "and output URIs and estimates GPU memory; bad data ends the job Failed (InvalidData), and a job "
            "that cannot fit in spec.resources.gpuMemory ends Failed (WillNotFit), with no GPU pod created. "
            "`skip`: the training gang starts at once (its ranks still check the data before training)."
        ),
    )
    resources: PreflightResources | None = Field(
        default=None,
        description=f"CPU and memory of the preflight pod. Default: cpu {PREFLIGHT_CPU}, memory {PREFLIGHT_MEMORY}.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=60,
        le=604800,
        description=(
            "How long one preflight pod may run before the job fails (PreflightDeadlineExceeded). "
            f"Default: {PREFLIGHT_DEADLINE_SECONDS}."
        ),
    )
    allow_will_not_fit: bool = Field(
        default=False,
        description=(
            "Start the training gang even when the memory estimate exceeds the GPU memory (FitsInMemory stays "
            "False, reason WillNotFit). Needs the GPU memory to be known: spec.resources.gpuMemory, or an "
            "nvidia.com/gpu.memory node selector."
        ),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        _preflight_used_only_by_auto(
            "resources", "!has(self.resources)", lambda m: m.resources is None, "sizes the preflight pod"
        ),
        _preflight_used_only_by_auto(
            "activeDeadlineSeconds",
            "!has(self.activeDeadlineSeconds)",
            lambda m: m.active_deadline_seconds is None,
            "bounds the preflight pod",
        ),
        _preflight_used_only_by_auto(
            "allowWillNotFit",
            "!self.allowWillNotFit",
            lambda m: not m.allow_will_not_fit,
            "overrides the preflight's memory-fit check",
        ),
    )

    def pod_resources(self) -> PreflightResources:
        """The preflight pod's resources: ``resources``, or the defaults."""
        return self.resources or PreflightResources()

    def deadline_seconds(self) -> int:
        """The preflight pod's deadline: ``activeDeadlineSeconds``, or the default."""
        return self.active_deadline_seconds or PREFLIGHT_DEADLINE_SECONDS


# --------------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------------


#: Optimizers that keep bitsandbytes' paged or 8-bit states: CUDA only.
CUDA_ONLY_OPTIMIZERS = ("adamw8bit", "pagedAdamw8bit", "pagedAdamw32bit")


def _cel_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


#: Processes per node as the operator starts them (``auto``: gpusPerNode, at least 1), in CEL.
_CEL_PROCS = (
    "(type(self.distributed.procsPerNode) == int ? self.distributed.procsPerNode : "
    "(self.resources.gpusPerNode > 1 ? self.resources.gpusPerNode : 1))"
)


def _procs(s: FineTuneJobSpec) -> int:
    procs = s.distributed.procs_per_node
    return procs if isinstance(procs, int) else max(s.resources.gpus_per_node, 1)


# --------------------------------------------------------------------------------------------------
# Rules generated from the task table (tasks.py): each is a CEL expression and a Python check built
# from the same row data.
# --------------------------------------------------------------------------------------------------


def _or(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _and(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _groups(key: Callable[[TaskRow], tuple[str, ...]]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(value, task types) for every distinct value of ``key`` over the table, in table order."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for row in TASKS:
        groups.setdefault(key(row), []).append(row.type)
    return [(value, tuple(types)) for value, types in groups.items()]


def _format_rule(formats: tuple[str, ...], tasks: tuple[str, ...]) -> Rule:
    verb = "needs" if len(tasks) == 1 else "need"
    return Rule(
        cel=f"!(self.task.type in [{_cel_list(tasks)}]) || self.data.format in [{_cel_list(formats)}]",
        message=f"spec.task.type {_and(tasks)} {verb} spec.data.format {_or(formats)}",
        check=lambda s: s.task.type not in tasks or s.data.format in formats,
        field=".data.format",
    )


def _method_rule(methods: tuple[str, ...], tasks: tuple[str, ...]) -> Rule:
    verb = "needs" if len(methods) == 1 else "need"
    return Rule(
        cel=f"!(self.method.type in [{_cel_list(methods)}]) || self.task.type in [{_cel_list(tasks)}]",
        message=f"spec.method.type {_and(methods)} {verb} spec.task.type {_or(tasks)}",
        check=lambda s: s.method.type not in methods or s.task.type in tasks,
        field=".method.type",
    )


def _packing_rule(tasks: tuple[str, ...]) -> Rule:
    return Rule(
        cel=f"!self.data.packing || self.task.type in [{_cel_list(tasks)}]",
        message=f"spec.data.packing is only supported for spec.task.type {_and(tasks)}",
        check=lambda s: not s.data.packing or s.task.type in tasks,
        field=".data.packing",
    )


def _eval_metrics_rule(metrics: tuple[str, ...], tasks: tuple[str, ...]) -> Rule:
    return Rule(
        cel=f"!(self.task.type in [{_cel_list(tasks)}]) || !has(self.training.evaluation) "
        f"|| !has(self.training.evaluation.metrics) "
        f"|| self.training.evaluation.metrics.all(m, m in [{_cel_list(metrics)}])",
        message=(
            f"spec.training.evaluation.metrics may only name metrics that spec.task.type {_or(tasks)} "
            f"produces: {_and(metrics)}"
        ),
        check=lambda s: (
            s.task.type not in tasks
            or s.training.evaluation.metrics is None
            or all(m in metrics for m in s.training.evaluation.metrics)
        ),
        field=".training.evaluation.metrics",
    )


def _early_stopping_rule(metrics: tuple[str, ...], tasks: tuple[str, ...]) -> Rule:
    return Rule(
        cel=f"!(self.task.type in [{_cel_list(tasks)}]) || !has(self.training.earlyStopping) "
        f"|| self.training.earlyStopping.metric in [{_cel_list(metrics)}]",
        message=(
            f"spec.training.earlyStopping.metric must be a metric that spec.task.type {_or(tasks)} "
            f"produces: {_or(metrics)}"
        ),
        check=lambda s: (
            s.task.type not in tasks or s.training.early_stopping is None or s.training.early_stopping.metric in metrics
        ),
        field=".training.earlyStopping.metric",
    )


def _general_eval_rule(tasks: tuple[str, ...]) -> Rule:
    return Rule(
        cel=f"!has(self.training.forgetting) || !has(self.training.forgetting.generalEval) "
        f"|| self.task.type in [{_cel_list(tasks)}]",
        message=(
            f"spec.training.forgetting.generalEval (perplexity on general text, through the LM head) is only "
            f"supported for spec.task.type {_and(tasks)}"
        ),
        check=lambda s: (
            s.training.forgetting is None or s.training.forgetting.general_eval is None or s.task.type in tasks
        ),
        field=".training.forgetting.generalEval",
    )


def _generation_metrics_rules() -> tuple[Rule, ...]:
    """``bleu``/``rouge`` (text generated after each eval prompt, scored against the record's own
    completion) need a format with prompts and eval data to generate for."""
    has_generation = (
        "has(self.training.evaluation) && has(self.training.evaluation.metrics) "
        f"&& self.training.evaluation.metrics.exists(m, m in [{_cel_list(GENERATION_METRICS)}])"
    )

    def asks(s: FineTuneJobSpec) -> bool:
        return any(m in GENERATION_METRICS for m in s.training.evaluation.metrics or ())

    return (
        Rule(
            cel=f"!({has_generation}) || self.data.format in [{_cel_list(PROMPT_FORMATS)}]",
            message=(
                f"spec.training.evaluation.metrics {_and(GENERATION_METRICS)} score text generated after each "
                f"eval prompt: they need spec.data.format {_or(PROMPT_FORMATS)} (records with a prompt and a "
                "reference completion)"
            ),
            check=lambda s: not asks(s) or s.data.format in PROMPT_FORMATS,
            field=".training.evaluation.metrics",
        ),
        Rule(
            cel=f"!({has_generation}) || has(self.data.eval) || self.data.evalSplit > 0.0",
            message=(
                f"spec.training.evaluation.metrics {_and(GENERATION_METRICS)} need eval data to generate for: "
                "spec.data.eval or spec.data.evalSplit"
            ),
            check=lambda s: not asks(s) or s.data.eval is not None or s.data.eval_split > 0,
            field=".training.evaluation.metrics",
        ),
    )


#: The tasks that train with spec.training.forgetting.ewc and .replay: the causal-LM recipe's (sft, pretrain).
FORGETTING_CONTROL_TASKS: tuple[str, ...] = tuple(row.type for row in TASKS if row.recipe == "causal_lm")


def _forgetting_control_rule(control: Literal["ewc", "replay"]) -> Rule:
    tasks = FORGETTING_CONTROL_TASKS
    return Rule(
        cel=f"!has(self.training.forgetting) || !has(self.training.forgetting.{control}) "
        f"|| self.task.type in [{_cel_list(tasks)}]",
        message=f"spec.training.forgetting.{control} is only supported for spec.task.type {_and(tasks)}",
        check=lambda s: (
            s.training.forgetting is None or getattr(s.training.forgetting, control) is None or s.task.type in tasks
        ),
        field=f".training.forgetting.{control}",
    )


#: EWC and replay: for the causal-LM tasks; EWC without DeepSpeed (its Fisher and penalty take whole,
#: unpartitioned parameters outside DeepSpeed's engine).
_FORGETTING_CONTROL_RULES: tuple[Rule, ...] = (
    _forgetting_control_rule("ewc"),
    _forgetting_control_rule("replay"),
    Rule(
        cel="!has(self.training.forgetting) || !has(self.training.forgetting.ewc) || !has(self.distributed.deepspeed)",
        message=(
            "spec.training.forgetting.ewc cannot be combined with spec.distributed.deepspeed (the Fisher "
            "information and the penalty take whole parameters, outside DeepSpeed's engine): use DDP"
        ),
        check=lambda s: (
            s.training.forgetting is None or s.training.forgetting.ewc is None or s.distributed.deepspeed is None
        ),
        field=".training.forgetting.ewc",
    ),
)


def _unsupported_task_rule(task: str) -> Rule:
    return Rule(
        cel=f"self.task.type != '{task}'",
        message=f"spec.task.type {task} is not supported yet: this release trains {_and(IMPLEMENTED_TASKS)}",
        check=lambda s: s.task.type != task,
        field=".task.type",
    )


def _method_groups() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(task types, methods) for every distinct set of tasks a method serves, but the set of all."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for method in ALL_METHODS:
        tasks = tuple(row.type for row in TASKS if method in row.methods)
        groups.setdefault(tasks, []).append(method)
    everything = tuple(row.type for row in TASKS)
    return [(tasks, tuple(methods)) for tasks, methods in groups.items() if tasks != everything]


#: What data each task reads, the methods it trains with, whether it packs, what it measures.
TASK_TABLE_RULES: tuple[Rule, ...] = (
    *(_format_rule(formats, tasks) for formats, tasks in _groups(lambda row: row.formats)),
    *(_method_rule(methods, tasks) for tasks, methods in _method_groups()),
    _packing_rule(tuple(row.type for row in TASKS if row.packing)),
    *(_eval_metrics_rule(metrics, tasks) for metrics, tasks in _groups(lambda row: row.metrics)),
    *(_early_stopping_rule(metrics, tasks) for metrics, tasks in _groups(lambda row: row.early_stopping_metrics)),
    _general_eval_rule(tuple(row.type for row in TASKS if row.head == "causal-lm")),
    *_generation_metrics_rules(),
)
#: A task whose recipe does not exist yet is refused, naming spec.task.type.
TASK_SUPPORT_RULES: tuple[Rule, ...] = tuple(_unsupported_task_rule(row.type) for row in TASKS if not row.implemented)


class FineTuneJobSpec(SpecModel):
    """Desired state of a FineTuneJob: what to train, on what, how, and where results go."""

    model: ModelSpec = Field(description="Base model to fine-tune.", json_schema_extra=immutable("spec.model"))
    task: TaskSpec = Field(
        default_factory=TaskSpec, description="Training objective.", json_schema_extra=immutable("spec.task")
    )
    method: MethodSpec = Field(
        default_factory=MethodSpec,
        description="Which parameters are trained.",
        json_schema_extra=immutable("spec.method"),
    )
    data: DataSpec = Field(description="Training and evaluation data.", json_schema_extra=immutable("spec.data"))
    training: TrainingSpec = Field(
        description="Optimization hyperparameters; the length of training (epochs or maxSteps) is required.",
        json_schema_extra=immutable("spec.training"),
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="Nodes, processes and DeepSpeed.",
        json_schema_extra=immutable("spec.distributed"),
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Per-node resources.")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec,
        description="Checkpoints and automatic resume.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.uri) == has(oldSelf.uri) && (!has(self.uri) || self.uri == oldSelf.uri)",
                    "message": "spec.checkpoint.uri cannot change after the job is created",
                }
            ]
        },
    )
    output: OutputSpec = Field(default_factory=OutputSpec, description="Result artifacts.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Prometheus metrics.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadline, TTL, queue.")
    preflight: PreflightSpec = Field(
        default_factory=PreflightSpec,
        description="The CPU-only data and memory-fit check run before the training gang (status.preflight).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.training.onDivergence != 'rollback' || (has(self.checkpoint) && has(self.checkpoint.uri))",
            message=(
                "spec.training.onDivergence rollback needs spec.checkpoint.uri (it restarts from a checkpoint "
                "written before the divergence)"
            ),
            check=lambda s: s.training.on_divergence != "rollback" or s.checkpoint.uri is not None,
            field=".training.onDivergence",
        ),
        Rule(
            cel="self.method.type != 'qlora' || self.model.dtype != 'fp32'",
            message=(
                "spec.method.type qlora needs spec.model.dtype auto, bf16 or fp16 "
                "(the non-quantized modules are kept in 16 bits)"
            ),
            check=lambda s: s.method.type != "qlora" or s.model.dtype != "fp32",
            field=".model.dtype",
        ),
        Rule(
            cel="self.method.type != 'qlora' || !has(self.distributed.deepspeed) "
            "|| self.distributed.deepspeed.zeroStage < 3",
            message="spec.method.type qlora cannot be combined with spec.distributed.deepspeed.zeroStage 3",
            check=lambda s: (
                s.method.type != "qlora" or s.distributed.deepspeed is None or s.distributed.deepspeed.zero_stage < 3
            ),
            field=".distributed.deepspeed.zeroStage",
        ),
        Rule(
            cel="!has(self.distributed.deepspeed) || self.distributed.deepspeed.offloadOptimizer == 'none' "
            "|| self.training.optimizer == 'adamw'",
            message=(
                "spec.distributed.deepspeed.offloadOptimizer cpu needs spec.training.optimizer adamw "
                "(DeepSpeed steps offloaded optimizer state with its own CPU Adam only)"
            ),
            check=lambda s: (
                s.distributed.deepspeed is None
                or s.distributed.deepspeed.offload_optimizer == "none"
                or s.training.optimizer == "adamw"
            ),
            field=".distributed.deepspeed.offloadOptimizer",
        ),
        *TASK_TABLE_RULES,
        Rule(
            cel=f"self.task.type != 'qa' "
            f"|| (has(self.task.qa) && has(self.task.qa.docStride) ? self.task.qa.docStride : {QA_DOC_STRIDE}) "
            "< self.data.maxSeqLength",
            message=(
                "spec.task.qa.docStride (the overlap of consecutive windows of a long context) must be below "
                "spec.data.maxSeqLength (the length of a window)"
            ),
            check=lambda s: s.task.type != "qa" or (s.task.qa or QAParams()).doc_stride < s.data.max_seq_length,
            field=".task.qa.docStride",
        ),
        Rule(
            cel="!self.data.packing || !(self.method.type in ['prefix', 'prompt'])",
            message="spec.data.packing cannot be combined with spec.method.type prefix or prompt",
            check=lambda s: not s.data.packing or s.method.type not in ("prefix", "prompt"),
            field=".data.packing",
        ),
        Rule(
            cel="!(has(self.training.earlyStopping) || has(self.training.evaluation.everySteps)) "
            "|| has(self.data.eval) || self.data.evalSplit > 0.0",
            message="spec.training evaluation and earlyStopping need spec.data.eval or spec.data.evalSplit",
            check=lambda s: (
                (s.training.early_stopping is None and s.training.evaluation.every_steps is None)
                or s.data.eval is not None
                or s.data.eval_split > 0
            ),
            field=".data.eval",
        ),
        Rule(
            cel="self.method.type != 'full' || !(self.output.save in ['adapter', 'both'])",
            message="spec.output.save adapter and both need a PEFT method, not spec.method.type full",
            check=lambda s: s.method.type != "full" or s.output.save not in ("adapter", "both"),
            field=".output.save",
        ),
        Rule(
            cel=f"!(self.output.save in ['merged', 'both']) || !(self.method.type in [{_cel_list(PROMPT_METHODS)}])",
            message=(
                "spec.output.save merged and both need an adapter that merges into the base model: "
                "spec.method.type prefix and prompt cannot merge (use auto or adapter)"
            ),
            check=lambda s: s.output.save not in ("merged", "both") or s.method.type not in PROMPT_METHODS,
            field=".output.save",
        ),
        Rule(
            cel="type(self.distributed.procsPerNode) != int || self.resources.gpusPerNode == 0 "
            "|| self.distributed.procsPerNode <= self.resources.gpusPerNode",
            message=(
                "spec.distributed.procsPerNode must not exceed spec.resources.gpusPerNode: every process "
                "drives its own GPU (use gpusPerNode 0 for processes on CPU)"
            ),
            check=lambda s: (
                not isinstance(s.distributed.procs_per_node, int)
                or s.resources.gpus_per_node == 0
                or s.distributed.procs_per_node <= s.resources.gpus_per_node
            ),
            field=".distributed.procsPerNode",
        ),
        Rule(
            cel=f"self.resources.gpusPerNode > 0 || !(self.training.optimizer in [{_cel_list(CUDA_ONLY_OPTIMIZERS)}])",
            message=(
                "spec.training.optimizer adamw8bit, pagedAdamw8bit and pagedAdamw32bit need CUDA: "
                "spec.resources.gpusPerNode must be at least 1"
            ),
            check=lambda s: s.resources.gpus_per_node > 0 or s.training.optimizer not in CUDA_ONLY_OPTIMIZERS,
            field=".training.optimizer",
        ),
        Rule(
            cel="!has(self.model.chatTemplate) || self.data.format == 'chat'",
            message="spec.model.chatTemplate is only used by spec.data.format chat (it renders the conversations)",
            check=lambda s: s.model.chat_template is None or s.data.format == "chat",
            field=".model.chatTemplate",
        ),
        Rule(
            cel="self.resources.gpusPerNode > 0 || self.model.attention != 'flash_attention_2'",
            message="spec.model.attention flash_attention_2 needs CUDA: spec.resources.gpusPerNode must be at least 1",
            check=lambda s: s.resources.gpus_per_node > 0 or s.model.attention != "flash_attention_2",
            field=".model.attention",
        ),
        Rule(
            # On CPU, accelerate applies no fp16 autocast or loss scaling: the run would train in fp32.
            cel="self.resources.gpusPerNode > 0 || self.training.precision != 'fp16'",
            message="spec.training.precision fp16 needs CUDA: spec.resources.gpusPerNode must be at least 1",
            check=lambda s: s.resources.gpus_per_node > 0 or s.training.precision != "fp16",
            field=".training.precision",
        ),
        Rule(
            cel=f"!self.metrics.enabled || self.metrics.port + {_CEL_PROCS} - 1 <= 65535",
            message="spec.metrics.port + local rank must stay within 65535 (local rank r serves metrics on port + r)",
            check=lambda s: not s.metrics.enabled or s.metrics.port + _procs(s) - 1 <= 65535,
            field=".metrics.port",
        ),
        Rule(
            cel=f"!self.metrics.enabled || self.distributed.rendezvousPort < self.metrics.port "
            f"|| self.distributed.rendezvousPort >= self.metrics.port + {_CEL_PROCS}",
            message=(
                "spec.distributed.rendezvousPort must not be one of the metrics ports (spec.metrics.port + local rank)"
            ),
            check=lambda s: (
                not s.metrics.enabled
                or not s.metrics.port <= s.distributed.rendezvous_port < s.metrics.port + _procs(s)
            ),
            field=".distributed.rendezvousPort",
        ),
        Rule(
            cel="self.method.type != 'adalora' || !has(self.method.adalora) || !has(self.training.maxSteps) "
            "|| self.method.adalora.tinit + self.method.adalora.tfinal < self.training.maxSteps",
            message=(
                "spec.method.adalora tinit + tfinal must be below spec.training.maxSteps "
                "(the rank budget shrinks in the steps between them)"
            ),
            check=lambda s: (
                s.method.type != "adalora"
                or s.method.adalora is None
                or s.training.max_steps is None
                or s.method.adalora.tinit + s.method.adalora.tfinal < s.training.max_steps
            ),
            field=".method.adalora.tfinal",
        ),
        Rule(
            cel="self.task.type != 'rl' || !has(self.task.rl) "
            "|| self.training.perDeviceBatchSize % self.task.rl.numGenerations == 0",
            message=(
                "spec.training.perDeviceBatchSize counts completions under spec.task.type rl and must be a "
                "multiple of spec.task.rl.numGenerations (each micro-batch holds whole groups of one prompt)"
            ),
            check=lambda s: (
                s.task.type != "rl"
                or s.task.rl is None
                or s.training.per_device_batch_size % s.task.rl.num_generations == 0
            ),
            field=".training.perDeviceBatchSize",
        ),
        Rule(
            cel="!(self.resources.gpusPerNode == 0 && self.distributed.backend == 'nccl')",
            message="spec.distributed.backend nccl needs spec.resources.gpusPerNode of at least 1",
            check=lambda s: not (s.resources.gpus_per_node == 0 and s.distributed.backend == "nccl"),
            field=".distributed.backend",
        ),
        Rule(
            cel="!self.preflight.allowWillNotFit || has(self.resources.gpuMemory) "
            f"|| (has(self.resources.nodeSelector) && '{GPU_MEMORY_LABEL}' in self.resources.nodeSelector "
            f"&& self.resources.nodeSelector['{GPU_MEMORY_LABEL}'].matches('^[0-9]+$'))",
            message=(
                "spec.preflight.allowWillNotFit needs the GPU memory the fit is checked against: "
                f"spec.resources.gpuMemory, or an {GPU_MEMORY_LABEL} node selector (MiB)"
            ),
            check=lambda s: not s.preflight.allow_will_not_fit or s.resources.gpu_memory_bytes is not None,
            field=".preflight.allowWillNotFit",
        ),
        Rule(
            cel="!has(self.task.dpo) || !self.task.dpo.precomputeReferenceLogProbs || self.distributed.nodes == 1",
            message=(
                "spec.task.dpo.precomputeReferenceLogProbs runs on one node only (the log-probabilities are "
                "written on the first node): set spec.distributed.nodes 1, or leave it false"
            ),
            check=lambda s: (
                s.task.dpo is None or not s.task.dpo.precompute_reference_log_probs or s.distributed.nodes == 1
            ),
            field=".task.dpo.precomputeReferenceLogProbs",
        ),
        Rule(
            cel="!has(self.task.distill) || self.task.distill.teacherQuantization == 'none' "
            "|| !has(self.distributed.deepspeed) || self.distributed.deepspeed.zeroStage < 3",
            message=(
                "spec.task.distill.teacherQuantization cannot be combined with spec.distributed.deepspeed.zeroStage "
                "3 (a 4-bit teacher is not partitioned): use none, or zeroStage 2 or less"
            ),
            check=lambda s: (
                s.task.distill is None
                or s.task.distill.teacher_quantization == "none"
                or s.distributed.deepspeed is None
                or s.distributed.deepspeed.zero_stage < 3
            ),
            field=".task.distill.teacherQuantization",
        ),
        Rule(
            cel="self.task.type != 'rl' || !has(self.task.rl) || self.task.rl.algorithm != 'ppo' "
            "|| !has(self.distributed.deepspeed) || self.distributed.deepspeed.zeroStage < 3",
            message=(
                "spec.task.rl.algorithm ppo cannot be combined with spec.distributed.deepspeed.zeroStage 3 (its "
                "generation and value head need whole weights on every rank): use zeroStage 2 or less, or grpo/rloo"
            ),
            check=lambda s: (
                s.task.type != "rl"
                or s.task.rl is None
                or s.task.rl.algorithm != "ppo"
                or s.distributed.deepspeed is None
                or s.distributed.deepspeed.zero_stage < 3
            ),
            field=".task.rl.algorithm",
        ),
        *_FORGETTING_CONTROL_RULES,
        # Last: a manifest of a task without a recipe is told about its other mistakes first.
        *TASK_SUPPORT_RULES,
    )

    def eval_metrics(self) -> tuple[EvalMetric, ...]:
        """The metrics every evaluation reports: spec.training.evaluation.metrics, or the task's defaults
        (all but the generation metrics)."""
        chosen = self.training.evaluation.metrics
        return tuple(chosen) if chosen is not None else task_row(self.task.type).default_metrics

    def model_uris(self) -> dict[str, str]:
        """Every model URI of the spec, by the field that holds it (``spec.model.uri``, ...)."""
        task = self.task
        found = {"spec.model.uri": self.model.uri}
        if task.rl is not None and task.rl.reward_model is not None:
            found["spec.task.rl.rewardModel"] = task.rl.reward_model
        if task.dpo is not None and task.dpo.reference_model is not None:
            found["spec.task.dpo.referenceModel"] = task.dpo.reference_model
        if task.distill is not None:
            found["spec.task.distill.teacher"] = task.distill.teacher
        return found

    def job_references(self) -> dict[str, str]:
        """The FineTuneJobs this spec takes models from (``ftj://NAME`` URIs): job name by field."""
        prefix = f"{JOB_URI_SCHEME}://"
        return {f: uri.removeprefix(prefix) for f, uri in self.model_uris().items() if uri.startswith(prefix)}

    def with_models(self, uris: dict[str, str]) -> FineTuneJobSpec:
        """This spec with the model URIs of the fields in ``uris`` replaced (keys as :meth:`model_uris`'s)."""
        task = self.task
        model = (
            self.model.model_copy(update={"uri": uris["spec.model.uri"]}) if "spec.model.uri" in uris else self.model
        )
        if "spec.task.rl.rewardModel" in uris and task.rl is not None:
            task = task.model_copy(
                update={"rl": task.rl.model_copy(update={"reward_model": uris["spec.task.rl.rewardModel"]})}
            )
        if "spec.task.dpo.referenceModel" in uris and task.dpo is not None:
            dpo = task.dpo.model_copy(update={"reference_model": uris["spec.task.dpo.referenceModel"]})
            task = task.model_copy(update={"dpo": dpo})
        if "spec.task.distill.teacher" in uris and task.distill is not None:
            distill = task.distill.model_copy(update={"teacher": uris["spec.task.distill.teacher"]})
            task = task.model_copy(update={"distill": distill})
        return self.model_copy(update={"model": model, "task": task})


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


class Condition(SpecModel):
    """A condition, following the Kubernetes API conventions."""

    type: str = Field(max_length=316, description="Condition type, e.g. Running, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="Status of the condition.")
    reason: str = Field(
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="Machine-readable reason in CamelCase, e.g. OOMKilled, Preempted.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(strict=False, description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was set for."
    )


class Progress(SpecModel):
    """Training progress, reported by rank 0."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps, in percent.")
    summary: str | None = Field(default=None, max_length=64, description="Short progress text, e.g. `120/500 (24%)`.")
    epoch: float | None = Field(default=None, ge=0, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    eval_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="Latest evaluation accuracy (classification, reward, dpo)."
    )
    eval_f1: float | None = Field(
        default=None, ge=0, le=1, description="Latest evaluation F1 (classification: macro F1; qa: token F1)."
    )
    eval_exact_match: float | None = Field(default=None, ge=0, le=1, description="Latest evaluation exact match (qa).")
    eval_perplexity: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Latest evaluation perplexity (sft, pretrain: exp of evalLoss; distill: exp of the student's "
            "cross-entropy on the labels, not of evalLoss)."
        ),
    )
    eval_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Latest evaluation agreement (distill: the fraction of positions where the student's top token "
        "is the teacher's).",
    )
    eval_bleu: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description=(
            "Latest evaluation BLEU: sacreBLEU corpus BLEU, on a 0-100 scale (not 0-1), of the completions generated "
            "after the eval prompts (when spec.training.evaluation.metrics lists bleu)."
        ),
    )
    eval_rougeL: float | None = Field(  # the trainer's key (metrics.jsonl): ROUGE-L, capital L
        default=None,
        alias="evalRougeL",
        ge=0,
        le=1,
        description=(
            "Latest evaluation ROUGE-L F-measure, 0-1, of the completions generated after the eval prompts (when "
            "spec.training.evaluation.metrics lists rouge)."
        ),
    )
    eval_reward: float | None = Field(
        default=None,
        description="Latest evaluation mean reward of completions sampled after the eval prompts (rl: ppo).",
    )
    reward: float | None = Field(
        default=None, description="Mean score of the latest logged rollouts' completions (rl), the reward's scale."
    )
    kl: float | None = Field(
        default=None, description="Latest mean per-token KL of the policy to its reference (rl, klCoef > 0)."
    )
    general_perplexity: float | None = Field(
        default=None, ge=0, description="Latest perplexity on general text (spec.training.forgetting.generalEval)."
    )
    general_perplexity_before: float | None = Field(
        default=None,
        ge=0,
        description="Perplexity on general text before training (the base model's; compare generalPerplexity).",
    )
    learning_rate: float | None = Field(default=None, ge=0, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training throughput.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated time to completion.")
    last_checkpoint_step: int | None = Field(default=None, ge=0, description="Step of the newest committed checkpoint.")
    seconds_per_step: float | None = Field(
        default=None, ge=0, description="Mean wall-clock seconds per optimizer step of this attempt so far."
    )
    updated_at: datetime | None = Field(default=None, strict=False, description="When this progress was reported.")


class RollbackRecord(SpecModel):
    """A divergence rolled back (spec.training.onDivergence rollback), as the trainer recorded it."""

    step: int = Field(ge=0, description="Optimizer step where the divergence began.")
    detected_step: int = Field(ge=0, description="Optimizer step where it was detected.")
    loss: float | None = Field(
        default=None, description="The diverged loss (mean of its logging window); null: non-finite."
    )
    lowest_loss: float | None = Field(default=None, description="The lowest window mean before it.")
    removed_checkpoints: list[int] = Field(
        default_factory=list, max_length=1000, description="Steps of the checkpoints written since it began, removed."
    )
    resumed_from: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Step of the checkpoint the next attempt resumed from; null until it resumes, or when no "
            "checkpoint was left before the divergence (it started over)."
        ),
    )
    learning_rate_scale: float = Field(gt=0, le=1, description="The learning rate's factor after this rollback.")
    time: datetime = Field(strict=False, description="When the divergence was detected.")


class CheckpointRecord(SpecModel):
    """A committed checkpoint."""

    step: int = Field(ge=0, description="Optimizer step of the checkpoint.")
    uri: str = Field(max_length=4096, description="Location of the checkpoint.")
    time: datetime = Field(strict=False, description="When it was committed.")


class Artifact(SpecModel):
    """A result of the job, with a digest to verify it."""

    kind: Literal["adapter", "merged", "model", "manifest"] = Field(description="What the artifact is.")
    uri: str = Field(max_length=4096, description="Location of the artifact.")
    sha256: str = Field(max_length=64, pattern=SHA256_PATTERN, description="SHA-256 of the artifact's file manifest.")
    bytes: int = Field(ge=0, description="Total size in bytes.")


class DataFileProvenance(SpecModel):
    """One data file a job read, and what identifies its content."""

    uri: str = Field(max_length=4096, description="The file (a local path, or an object-storage URI).")
    role: Literal["train", "eval", "general", "replay", "fisher"] = Field(
        description="What the job read it for (replay: forgetting.replay.source; fisher: forgetting.ewc.fisherData)."
    )
    bytes: int | None = Field(default=None, ge=0, description="Size in bytes.")
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN, description="SHA-256 of a local file's bytes.")
    etag: str | None = Field(
        default=None,
        max_length=1024,
        description="A stored object's ETag or version (its store's identity of the content; not re-read).",
    )


class ModelProvenance(SpecModel):
    """The base model a job trained from."""

    uri: str = Field(max_length=4096, description="spec.model.uri as given.")
    revision: str | None = Field(
        default=None, max_length=256, description="The Hub commit the revision (or the default branch) resolved to."
    )
    sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="SHA-256 of the model files' manifest (every file's path, size and SHA-256), for a stored copy.",
    )


#: The fields of status.provenance the operator sets (from the pods, and its own version); the trainer
#: sets the others. Each patches only its own, so neither overwrites the other's.
PROVENANCE_OPERATOR_FIELDS = ("image", "operator_version", "nodes")


class Provenance(SpecModel):
    """What produced a job's model: code, model, data, randomness and hardware. The trainer reports it
    with the outputs (also in the output's ``provenance.json``); the operator adds what only the cluster
    knows (the image digest, the nodes, its own version)."""

    image: str | None = Field(
        default=None, max_length=1024, description="The trainer image by digest (the trainer pod's imageID)."
    )
    operator_version: str | None = Field(default=None, max_length=64, description="Version of the operator.")
    nodes: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=256, description="Nodes the training pods ran on."
    )
    accelerator: str | None = Field(
        default=None, max_length=256, description="Accelerator the trainer ran on (e.g. `NVIDIA H200`; `cpu`)."
    )
    model: ModelProvenance | None = Field(default=None, description="The base model.")
    data: list[DataFileProvenance] = Field(default_factory=list, max_length=1024, description="Every data file read.")
    tokenizer_sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="SHA-256 of the tokenizer as loaded (vocabulary, merges, added and special tokens, template).",
    )
    chat_template_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="SHA-256 of the chat template in use, if any."
    )
    seed: int | None = Field(default=None, description="spec.training.seed.")
    checkpoint_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="SHA-256 of the manifest of the last committed checkpoint."
    )
    libraries: dict[str, Annotated[str, Field(max_length=128)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Versions of what trained it: python, torch, cuda, transformers, peft, trl, deepspeed, ...",
    )


class Dependency(SpecModel):
    """A model this job takes from another FineTuneJob (an ``ftj://NAME`` URI), as resolved."""

    field: str = Field(max_length=256, description="The spec field that names it, e.g. `spec.task.rl.rewardModel`.")
    job: str = Field(max_length=253, description="The FineTuneJob it comes from (same namespace).")
    uri: str = Field(max_length=4096, description="Where that job's merged model is.")
    sha256: str = Field(
        pattern=SHA256_PATTERN, description="SHA-256 of its output manifest, which the trainer verifies."
    )


class FailureInfo(SpecModel):
    """The most recent failure of a trainer container."""

    exit_code: int | None = Field(default=None, description="Exit code of the failing container.")
    reason: str = Field(
        max_length=1024, description="Reason, e.g. OOMKilled, Preempted, NodeLost, Stalled, InvalidData."
    )
    message: str = Field(default="", max_length=32768, description="Last message of the container.")
    time: datetime | None = Field(default=None, strict=False, description="When the failure was observed.")


#: Condition types the operator sets from the preflight (status.preflight), and their reasons when False.
CONDITION_DATA_VALID = "DataValid"
CONDITION_FITS_IN_MEMORY = "FitsInMemory"
REASON_INVALID_DATA = "InvalidData"
REASON_WILL_NOT_FIT = "WillNotFit"
#: At most this many problems are kept in status.preflight.problems (and the termination message).
PREFLIGHT_MAX_PROBLEMS = 20


class PreflightMemory(SpecModel):
    """The memory-fit estimate of one rank (finetune_operator.api.memory), in bytes."""

    weights: int = Field(ge=0, description="Bytes of the weights a rank holds.")
    gradients: int = Field(ge=0, description="Bytes of the gradients.")
    optimizer: int = Field(ge=0, description="Bytes of the optimizer states.")
    activations: int = Field(ge=0, description="Bytes of the activations at their peak (one micro-batch).")
    overhead: int = Field(ge=0, description="CUDA context, NCCL buffers and allocator fragmentation.")
    total: int = Field(ge=0, description="Peak bytes per GPU: what is compared with the GPU's memory.")
    host_bytes: int | None = Field(default=None, ge=0, description="Host memory per rank for CPU offload.")
    world_size: int | None = Field(default=None, ge=1, description="Ranks the estimate is for.")
    parameters: int | None = Field(default=None, ge=0, description="Parameters of the model.")
    trainable_parameters: int | None = Field(default=None, ge=0, description="Parameters that train.")


class PreflightResult(SpecModel):
    """What the preflight found (``python -m finetune_trainer preflight``, or ``finetune plan``): written by
    the preflight pod to its termination message as JSON, and by the operator to status.preflight."""

    train_records: int | None = Field(default=None, ge=0, description="Training records that passed the checks.")
    eval_records: int | None = Field(default=None, ge=0, description="Evaluation records that passed the checks.")
    bad_records: int = Field(default=0, ge=0, description="Records that failed a check.")
    token_length_p50: float | None = Field(default=None, ge=0, description="Median tokens per training sample.")
    token_length_p95: float | None = Field(
        default=None, ge=0, description="95th percentile of tokens per training sample."
    )
    token_length_max: int | None = Field(default=None, ge=0, description="Longest training sample, in tokens.")
    truncated_fraction: float | None = Field(
        default=None, ge=0, le=1, description="Fraction of samples cut at spec.data.maxSeqLength."
    )
    tokens_per_epoch: int | None = Field(default=None, ge=0, description="Tokens one epoch trains on.")
    steps_per_epoch: int | None = Field(default=None, ge=0, description="Optimizer steps per epoch.")
    cache_uri: str | None = Field(default=None, max_length=4096, description="Where the tokenized cache is.")
    cache_hit: bool = Field(default=False, description="The tokenized cache existed already (nothing tokenized).")
    memory: PreflightMemory | None = Field(
        default=None, description="Estimated GPU memory per rank; absent when the model is not supported."
    )
    memory_note: str | None = Field(default=None, max_length=1024, description="Why there is no memory estimate.")
    write_access: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=8, description="URIs a test object was written to and deleted from."
    )
    problems: list[Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=list,
        max_length=PREFLIGHT_MAX_PROBLEMS,
        description="The first problems of the data, each `file:line: reason`.",
    )
    completed_at: datetime | None = Field(default=None, strict=False, description="When the preflight finished.")
    gpu_memory: int | None = Field(
        default=None, ge=0, description="Bytes of GPU memory the estimate was checked against (by the operator)."
    )
    fits: bool | None = Field(
        default=None, description="Whether memory.total fits in gpuMemory (decided by the operator, not the pod)."
    )


class FineTuneJobStatus(SpecModel):
    """Observed state of a FineTuneJob, derived by the operator from the Job and its pods."""

    phase: Phase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description=(
            "Conditions: Created, Running, Restarting, Succeeded, Failed, Suspended; DataValid and FitsInMemory "
            "from the preflight."
        ),
    )
    start_time: datetime | None = Field(default=None, strict=False, description="When training pods first started.")
    completion_time: datetime | None = Field(default=None, strict=False, description="When the job finished.")
    restarts: int = Field(default=0, ge=0, description="Gang restarts so far.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    rollbacks: list[RollbackRecord] = Field(
        default_factory=list, max_length=100, description="Divergences rolled back (written by the trainer)."
    )
    checkpoints: list[CheckpointRecord] = Field(
        default_factory=list, max_length=1000, description="Committed checkpoints, oldest first."
    )
    artifacts: list[Artifact] = Field(default_factory=list, max_length=64, description="Results written by the job.")
    provenance: Provenance | None = Field(default=None, description="What produced the job's model.")
    dependencies: list[Dependency] = Field(
        default_factory=list,
        max_length=8,
        description="The models taken from other FineTuneJobs (`ftj://` URIs), resolved when they succeeded.",
    )
    last_failure: FailureInfo | None = Field(default=None, description="The most recent failure.")
    preflight: PreflightResult | None = Field(
        default=None, description="The preflight's findings (spec.preflight.mode auto), before the training gang."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this status was derived from."
    )


# --------------------------------------------------------------------------------------------------
# The object
# --------------------------------------------------------------------------------------------------


#: Largest total size of an object's annotations (keys and values), as the API server counts it.
MAX_ANNOTATIONS_BYTES = 256 * 1024


class OwnerReference(SpecModel):
    """An owner of the object (deleting it deletes this one)."""

    api_version: str = Field(min_length=1, description="API version of the owner.")
    kind: str = Field(min_length=1, description="Kind of the owner.")
    name: str = Field(min_length=1, description="Name of the owner.")
    uid: str = Field(min_length=1, description="UID of the owner.")
    controller: bool | None = Field(default=None, description="The owner is the managing controller.")
    block_owner_deletion: bool | None = Field(default=None, description="Foreground deletion waits for this.")


class ObjectMeta(SpecModel):
    """Kubernetes object metadata (``metadata``): the fields a manifest sets, checked by the rules the
    API server applies, and those the server adds (so objects read back validate too). Unknown keys
    are refused, as ``kubectl apply`` refuses them."""

    name: str = Field(
        max_length=MAX_NAME_LENGTH,
        pattern=DNS_LABEL_PATTERN,
        description="Job name: a DNS label (lower case, starts with a letter).",
    )
    generate_name: str | None = Field(default=None, max_length=253, description="Name prefix (server-generated).")
    namespace: str | None = Field(default=None, max_length=63, pattern=NAMESPACE_PATTERN, description="Namespace.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    finalizers: list[str] = Field(default_factory=list, description="Finalizers.")
    owner_references: list[OwnerReference] = Field(default_factory=list, description="Owners.")
    # Set by the API server.
    uid: str | None = Field(default=None, description="Unique id.")
    resource_version: str | None = Field(default=None, description="Resource version.")
    generation: int | None = Field(default=None, description="Generation of the spec.")
    creation_timestamp: datetime | None = Field(default=None, strict=False, description="Creation time.")
    deletion_timestamp: datetime | None = Field(default=None, strict=False, description="Deletion time.")
    deletion_grace_period_seconds: int | None = Field(default=None, description="Deletion grace period.")
    managed_fields: list[dict[str, Any]] = Field(default_factory=list, description="Field managers.")
    self_link: str | None = Field(default=None, description="Deprecated self link.")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, labels: Any) -> Any:
        # Before type validation, so that every problem with labels is reported at metadata.labels,
        # as the API server reports it.
        if not isinstance(labels, dict):
            return labels
        for key, value in labels.items():
            if not isinstance(key, str) or not is_qualified_name(key):
                raise PydanticCustomError(
                    "label_key", "'{key}' is not a valid label key: " + QUALIFIED_NAME_HINT, {"key": key}
                )
            if not isinstance(value, str):
                raise PydanticCustomError("label_value", "the value of {key} must be a string", {"key": key})
            if not is_label_value(value):
                raise PydanticCustomError(
                    "label_value", "the value of {key} is not a valid label value: " + LABEL_VALUE_HINT, {"key": key}
                )
        return labels

    @field_validator("finalizers", mode="before")
    @classmethod
    def _finalizers(cls, finalizers: Any) -> Any:
        for name in finalizers if isinstance(finalizers, list) else ():
            if isinstance(name, str) and not is_qualified_name(name):
                raise PydanticCustomError(
                    "finalizer", "'{name}' is not a valid finalizer name: " + QUALIFIED_NAME_HINT, {"name": name}
                )
        return finalizers

    @field_validator("annotations", mode="before")
    @classmethod
    def _annotations(cls, annotations: Any) -> Any:
        if not isinstance(annotations, dict):
            return annotations
        for key, value in annotations.items():
            if not isinstance(key, str) or not is_qualified_name(key):
                raise PydanticCustomError(
                    "annotation_key", "'{key}' is not a valid annotation key: " + QUALIFIED_NAME_HINT, {"key": key}
                )
            if not isinstance(value, str):
                raise PydanticCustomError("annotation_value", "the value of {key} must be a string", {"key": key})
        size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise PydanticCustomError(
                "annotations_size", "annotations may total at most 256 KiB (these are {size} bytes)", {"size": size}
            )
        return annotations


class FineTuneJob(SpecModel):
    """A distributed fine-tuning run of a language model."""

    api_version: Literal["finetune.io/v1alpha1"] = Field(alias="apiVersion", description="API version.")
    kind: Literal["FineTuneJob"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")


#: CEL rules on metadata.name (a CRD's schema may constrain metadata.name and nothing else of the
#: metadata). In Python the same limits are ObjectMeta.name's max_length and pattern.
NAME_VALIDATIONS: list[dict[str, str]] = [
    {
        "rule": f"size(self) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add suffixes)",
    },
    {
        "rule": f"self.matches(r'{DNS_LABEL_PATTERN}')",
        "message": "metadata.name must be a DNS label starting with a letter (it names a Service)",
    },
]
