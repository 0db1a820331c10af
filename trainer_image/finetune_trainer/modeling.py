"""Load the base model and its tokenizer from wherever ``spec.model.uri`` points.

Supported sources: a local directory (or ``file://``), an object-storage prefix (``s3://``, ``gs://``,
``az://``; copied once into the local cache by one rank per node while the others wait), a Hugging
Face Hub id (with ``revision``), ``pkg://<package>`` for model files shipped inside an installed Python
package, and GGUF files (``ggufFile``; dequantized at load). ``trustRemoteCode`` stays off unless the
spec asks. ``addTokens`` grows the tokenizer and the embeddings; the methods make the new rows
trainable.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from finetune_operator.api.tasks import Head
from finetune_operator.api.v1alpha1 import ModelSpec
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_QUESTION_ANSWERING_MAPPING

from . import storage
from .distributed import World, local_main_first
from .errors import ConfigError
from .file_manifest import sha256_file

if TYPE_CHECKING:
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

#: The attribute transformers' question-answering models give their span layer.
#: The attribute names transformers gives the layer of a task head other than the LM head (peft looks
#: for them too): a sequence classifier's ``score`` (Llama-family and other decoders) or ``classifier``
#: (encoders), an extractive-QA model's ``qa_outputs``.
HEAD_MODULES: dict[Head, tuple[str, ...]] = {
    "sequence-classification": ("score", "classifier"),
    "reward": ("score", "classifier"),
    "question-answering": ("qa_outputs",),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: ChatML, used when neither the tokenizer nor the spec brings a chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelSourceError(ConfigError):
    """The model named in spec.model cannot be found or read."""


@dataclass(frozen=True)
class ModelSource:
    """A model location resolved to what ``from_pretrained`` takes."""

    path: str  #: a local directory, or a Hub id
    revision: str | None
    gguf_file: str | None
    is_local: bool


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (a model package may import heavy things).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"spec.model.uri: Python package '{name}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(model: ModelSpec, *, base_dir: str | None, cache_dir: str | Path, world: World) -> ModelSource:
    """Turn spec.model into a local directory (downloading if needed) or a Hub id."""
    uri = model.uri
    local_path = storage.local_path(uri, base_dir)
    is_dir = not storage.is_remote(uri) and os.path.isdir(local_path)
    hub_id = not (uri.startswith(("pkg://", "file://", "/", "./", "../")) or storage.is_remote(uri) or is_dir)
    if model.revision and not hub_id:
        # Admission refuses a revision with a path or a URI with a scheme; that a relative path which
        # looks like a Hub id (org/name) is a directory is only known here.
        raise ModelSourceError(
            f"spec.model.revision is only used for Hub ids: spec.model.uri {uri} is a directory or a stored copy"
        )
    if uri.startswith("pkg://"):
        package, _, sub = uri[len("pkg://") :].partition("/")
        path = _package_dir(package) / sub if sub else _package_dir(package)
        return ModelSource(str(path), None, model.gguf_file, True)
    if storage.is_remote(uri):
        with local_main_first(world):
            local = storage.download(uri, Path(cache_dir) / "models")
        return ModelSource(str(local), None, model.gguf_file, True)
    if uri.startswith(("file://", "/", "./", "../")) or is_dir:
        if not is_dir:
            raise ModelSourceError(f"spec.model.uri: directory {local_path} does not exist")
        return ModelSource(local_path, None, model.gguf_file, True)
    return ModelSource(uri, model.revision, model.gguf_file, False)


def verify_artifact(source: ModelSource, uri: str, expected: str, *, base_dir: str | None, field: str) -> None:
    """Check a model taken from another FineTuneJob (an ``ftj://`` URI, resolved to ``uri``: a folder
    of that job's output) against the digest it was resolved with: the output's ``manifest.json`` (the
    folder's parent) has that SHA-256, and every file the manifest lists in the folder is in
    ``source.path`` with its size and SHA-256. A mismatch (the output was replaced or damaged since)
    is a ConfigError naming ``field``: the job must not train on another model than the one it named."""
    parent, _, folder = uri.rstrip("/").rpartition("/")
    try:
        manifest = storage.read_bytes(f"{parent}/manifest.json", base_dir=base_dir)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read the manifest of {uri}: {exc}") from None
    actual = hashlib.sha256(manifest).hexdigest()
    if actual != expected:
        raise ConfigError(
            f"{field}: the output at {uri} is not the one resolved: its manifest's sha256 is {actual}, "
            f"expected {expected}"
        )
    root = Path(source.path)
    for entry in json.loads(manifest)["files"]:
        if not entry["path"].startswith(folder + "/"):
            continue
        path = root / entry["path"][len(folder) + 1 :]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ConfigError(f"{field}: {uri}: {entry['path']} does not match the output's manifest")


#: The files of a stored model that its config and tokenizer are read from: JSON (config.json,
#: generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json,
#: added_tokens.json, weight index files), text (merges.txt, vocab.txt), SentencePiece and tiktoken
#: vocabularies, chat templates, and the Python modules of a ``trustRemoteCode`` model. Never weights
#: (``*.safetensors``, ``*.bin``, ``*.pt``, ...), which are all other suffixes.
CONFIG_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")


def is_config_file(name: str, gguf_file: str | None = None) -> bool:
    """Whether a stored model's file is needed to read its config and tokenizer (:data:`CONFIG_FILE_SUFFIXES`;
    for a GGUF model also its ``ggufFile``, which holds both, and its weights)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.lower().endswith(CONFIG_FILE_SUFFIXES) or (gguf_file is not None and base == gguf_file)


def resolve_config_source(model: ModelSpec, *, base_dir: str | None, cache_dir: str | Path) -> ModelSource:
    """``spec.model`` resolved as :func:`resolve_source` does, for its config and tokenizer only (the
    preflight): a model in object storage is copied without its weight files (:func:`is_config_file`)
    into ``<cache_dir>/model-configs``, apart from the training cache, which a partial copy must never
    stand in for. A local directory or package is read in place; a Hub id is left to transformers,
    whose config and tokenizer loaders fetch only their own files. A GGUF model's config and tokenizer
    are inside its one file, which is fetched whole."""
    uri = model.uri
    if not storage.is_remote(uri):
        # No download for a path, a package or a Hub id: the world is irrelevant.
        return resolve_source(model, base_dir=base_dir, cache_dir=cache_dir, world=World(0, 0, 1, 1))
    local = _download_config_files(uri, Path(cache_dir) / "model-configs", model.gguf_file)
    return ModelSource(str(local), None, model.gguf_file, True)


def _download_config_files(uri: str, cache_root: Path, gguf_file: str | None) -> Path:
    """Copy the config and tokenizer files of a stored model (:func:`is_config_file`) into the cache
    (once; a temporary directory renamed into place when complete, as :func:`.storage.download` does)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root / digest
    if target.exists():
        return target
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise ModelSourceError(f"spec.model.uri: {uri} does not exist")
    files = [p for p in fs.find(root) if is_config_file(p, gguf_file)]
    if not files:
        raise ModelSourceError(f"spec.model.uri: {uri} holds no model config (config.json, tokenizer files)")
    partial = cache_root / f".{digest}.partial-{os.getpid()}"
    for path in files:
        local = partial / path[len(root) :].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local))
    partial.rename(target)
    return target


@contextmanager
def spec_errors(model: ModelSpec) -> Iterator[None]:
    """transformers' refusals that a spec.model field decides, as ConfigErrors naming the field (exit 2:
    retrying cannot help): a model whose own code is needed without ``trustRemoteCode``, an attention
    implementation the model does not support. Other errors pass unchanged."""
    try:
        yield
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        text = str(exc).strip()
        if "trust_remote_code" in text:
            raise ConfigError(
                f"spec.model.trustRemoteCode: {model.uri} needs its own code to load, which runs only with "
                f"spec.model.trustRemoteCode: true (for a model you trust): {text}"
            ) from exc
        if model.attention != "auto" and "attention" in text.lower():
            raise ConfigError(f"spec.model.attention: {model.attention}: {text}") from exc
        raise


def _common_kwargs(source: ModelSource, model: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def load_tokenizer(source: ModelSource, model: ModelSpec) -> PreTrainedTokenizerBase:
    with spec_errors(model):
        tokenizer = AutoTokenizer.from_pretrained(source.path, **_common_kwargs(source, model))
    if model.chat_template:
        tokenizer.chat_template = model.chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.add_tokens:
        tokenizer.add_tokens(list(model.add_tokens))
    return tokenizer


def dropout_overrides(source: ModelSource, model: ModelSpec, dropout: float | None) -> dict[str, float]:
    """Config overrides that set every dropout probability of the model's config to ``dropout``."""
    if dropout is None:
        return {}
    with spec_errors(model):
        config = AutoConfig.from_pretrained(source.path, **_common_kwargs(source, model))
    names = [k for k, v in config.to_dict().items() if isinstance(v, float) and ("dropout" in k or k.endswith("pdrop"))]
    return dict.fromkeys(names, dropout)


def load_causal_lm(
    source: ModelSource,
    model: ModelSpec,
    *,
    dtype: torch.dtype | str,
    overrides: dict[str, Any] | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """Load a causal LM. ``extra`` carries method-specific arguments (QLoRA's quantization_config)."""
    return _load(AutoModelForCausalLM, source, model, dtype=dtype, overrides=overrides, **extra)


def load_question_answering(
    source: ModelSource,
    model: ModelSpec,
    *,
    dtype: torch.dtype | str,
    overrides: dict[str, Any] | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """Load the base with an extractive-QA span head (``AutoModelForQuestionAnswering``: for Llama-family
    models ``LlamaForQuestionAnswering``, whose ``qa_outputs`` linear layer gives each token a start
    and an end logit). The head is newly initialized from the current seed unless the checkpoint has
    one (a QA model saved by an earlier run).

    transformers names the base model of several decoder QA classes ``transformer`` (Llama, Mistral,
    Qwen2, ...: ``base_model_prefix``, kept for backward compatibility) while their causal-LM
    checkpoints store it under ``model``: loaded as they are, every base weight would be missing and
    silently re-initialized (huggingface/transformers#30381). The checkpoint's keys are renamed to the
    QA class's prefix at load (``key_mapping``); a checkpoint already in the QA layout has no key to
    rename, and models saved from the loaded one keep the QA layout. ``extra`` as for
    :func:`load_causal_lm`.

    Under 4-bit quantization (QLoRA) the span layer stays in the weights' dtype, as a causal LM's
    head does: transformers keeps the last parameter's module unquantized, but the last parameter of
    ``qa_outputs`` is its bias, so it would quantize the layer (which then cannot be trained) unless
    told to skip it.
    """
    with spec_errors(model):
        config = AutoConfig.from_pretrained(source.path, **_common_kwargs(source, model))
    # transformers types its lazy mappings' values loosely: they are model classes.
    qa_class = cast("type[PreTrainedModel] | None", MODEL_FOR_QUESTION_ANSWERING_MAPPING.get(type(config), None))
    if qa_class is None:
        raise ModelSourceError(
            f"spec.model.uri: transformers has no question-answering head for model type "
            f"'{config.model_type}' (spec.task.type qa needs AutoModelForQuestionAnswering)"
        )
    lm_class = cast("type[PreTrainedModel] | None", MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None))
    qa_prefix, lm_prefix = qa_class.base_model_prefix, getattr(lm_class, "base_model_prefix", None)
    renaming = {rf"^{lm_prefix}\.": f"{qa_prefix}."} if lm_prefix and lm_prefix != qa_prefix else {}
    if renaming:
        extra = {"key_mapping": renaming, **extra}
    extra = _head_unquantized(extra, "question-answering")
    loaded = _load(AutoModelForQuestionAnswering, source, model, dtype=dtype, overrides=overrides, **extra)
    # transformers remembers the renaming and undoes it when the model is saved: a saved (merged) model
    # would then hold its weights under the causal LM's names, and a plain from_pretrained of the QA
    # class would miss them all again. Forgotten, saves use the QA class's own names.
    # Imported here: it loads accelerate and the weight-conversion machinery (seconds), which reading a
    # config and a tokenizer (the preflight) does not need.
    from transformers.core_model_loading import WeightRenaming

    conversions = getattr(loaded, "_weight_conversions", None)
    if renaming and conversions:
        kept = [c for c in conversions if not (isinstance(c, WeightRenaming) and c.source_patterns == list(renaming))]
        loaded._weight_conversions = kept  # type: ignore[assignment]  # nn.Module types attributes as Tensor | Module
    return loaded


def load_sequence_classification(
    source: ModelSource,
    model: ModelSpec,
    *,
    dtype: torch.dtype | str,
    class_names: list[str],
    multi_label: bool,
    pad_token_id: int,
    overrides: dict[str, Any] | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """Load the base with a sequence-classification head (``AutoModelForSequenceClassification``: for
    Llama-family causal LMs ``LlamaForSequenceClassification``, whose ``score`` layer maps the hidden
    state of the last token that is not padding to one logit per class; encoders' own heads). The
    head is newly initialized from the current seed unless the checkpoint has one (a classifier saved
    by an earlier run). The config gets the classes (``num_labels``, ``id2label``/``label2id`` from
    ``class_names``), the problem type (single- or multi-label) and the pad token, which decoder
    classifiers need to find each row's last token. Under 4-bit quantization (QLoRA) the
    classification layer stays in the weights' dtype, to be trained. ``extra`` as for
    :func:`load_causal_lm`.
    """
    head = {
        "num_labels": len(class_names),
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: i for i, name in enumerate(class_names)},
        "problem_type": "multi_label_classification" if multi_label else "single_label_classification",
        "pad_token_id": pad_token_id,
    }
    extra = _head_unquantized(extra, "sequence-classification")
    return _load(
        AutoModelForSequenceClassification, source, model, dtype=dtype, overrides={**(overrides or {}), **head}, **extra
    )


def load_reward_model(
    source: ModelSource,
    model: ModelSpec,
    *,
    dtype: torch.dtype | str,
    pad_token_id: int,
    overrides: dict[str, Any] | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """Load the base with a reward head: ``AutoModelForSequenceClassification`` with one output, the
    scalar reward of a sequence (``num_labels=1``, as trl's RewardTrainer loads one). Llama-family
    decoders' ``score`` layer reads the hidden state of the last token that is not the pad token, so
    the config gets the tokenizer's: without one transformers refuses a batch of several rows and
    scores the last position of a single one. The head is newly initialized from the current seed unless
    the checkpoint has one (a reward model saved by an earlier run); under 4-bit quantization (QLoRA)
    it stays in the weights' dtype, to be trained. ``extra`` as for :func:`load_causal_lm`.
    """
    head = {"num_labels": 1, "pad_token_id": pad_token_id}
    extra = _head_unquantized(extra, "reward")
    return _load(
        AutoModelForSequenceClassification, source, model, dtype=dtype, overrides={**(overrides or {}), **head}, **extra
    )


def _head_unquantized(extra: dict[str, Any], head: Head) -> dict[str, Any]:
    """``extra`` with its 4-bit quantization config (QLoRA), if any, told to leave the task head's
    layer (:data:`HEAD_MODULES`) in the weights' dtype, to be trained."""
    quantization = extra.get("quantization_config")
    if quantization is None:
        return extra
    quantization = copy.deepcopy(quantization)
    quantization.llm_int8_skip_modules = [*(quantization.llm_int8_skip_modules or []), *HEAD_MODULES[head]]
    return {**extra, "quantization_config": quantization}


def _load(
    auto_class: type[_BaseAutoModelClass],
    source: ModelSource,
    model: ModelSpec,
    *,
    dtype: torch.dtype | str,
    overrides: dict[str, Any] | None,
    **extra: Any,
) -> PreTrainedModel:
    """``auto_class.from_pretrained`` with the spec's source, attention, dtype and config overrides."""
    kwargs = {**_common_kwargs(source, model), **(overrides or {}), **extra, "dtype": dtype}
    if model.attention != "auto":
        kwargs["attn_implementation"] = model.attention
    with spec_errors(model):
        loaded: PreTrainedModel = auto_class.from_pretrained(source.path, **kwargs)
    if source.gguf_file:
        loaded = _plain_copy(auto_class, loaded)
    return loaded


def _plain_copy(auto_class: type[_BaseAutoModelClass], model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF model is dequantized at load, but still flagged as quantized, which transformers refuses
    to train or save. Rebuild it as a plain model holding the same (dequantized) weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers leaves from_config unannotated.
    plain: PreTrainedModel
    plain = auto_class.from_config(config, dtype=model.dtype)  # type: ignore[no-untyped-call]
    plain.load_state_dict(model.state_dict())
    if model.can_generate():  # a task head (classification, QA) has no generation config
        plain.generation_config = model.generation_config
    return plain


def grow_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Resize embeddings to the tokenizer; return the ids of the added rows (empty when none).

    Each new row (input embeddings and, when untied, the output head's) starts as the mean of the rows
    of the pieces the tokenizer splits its token into without the added tokens
    (:func:`.data.vocabulary.base_pieces`): ``addTokens`` and mined words alike start where the model
    read them before. A token none of whose pieces has a row keeps transformers' initialisation (the
    mean of all rows, with noise of their covariance)."""
    old = cast(torch.Tensor, model.get_input_embeddings().weight).shape[0]  # nn.Module types it Tensor | Module
    new = len(tokenizer)
    if new <= old:
        return []
    model.resize_token_embeddings(new, mean_resizing=True)
    _init_from_pieces(model, tokenizer, range(old, new), old)
    return list(range(old, new))


def _init_from_pieces(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: range, old: int) -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from .data.vocabulary import base_pieces

    added = tokenizer.added_tokens_decoder
    pieces = {}
    for token_id in ids:
        if token_id not in added:  # a vocabulary larger than the model's embeddings: no text to split
            continue
        found = [p for p in base_pieces(tokenizer, added[token_id].content) if p < old]
        if found:
            pieces[token_id] = found
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # unannotated in transformers
    weights = [cast(torch.Tensor, embedding.weight)]
    if head is not None and head.weight is not weights[0]:
        weights.append(cast(torch.Tensor, head.weight))
    gathered: Any = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():  # type: ignore[no-untyped-call]  # unannotated in transformers
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gathered, torch.no_grad():
        for weight in weights:
            if weight.numel() == 0:  # a ZeRO-3 shard on a rank that does not modify it
                continue
            for token_id, found in pieces.items():
                weight[token_id] = weight[found].float().mean(dim=0).to(weight.dtype)


def model_dtype(requested: str) -> torch.dtype | str:
    """The dtype weights are loaded in; `auto` keeps the checkpoint's own."""
    return "auto" if requested == "auto" else DTYPES[requested]


def greedy_completion(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The token ids a model generates greedily after ``prompt_ids`` (at most ``max_new_tokens``), as
    ``finetune predict`` completes a record's prompt."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    completion: list[int] = generated[0, len(prompt_ids) :].tolist()
    return completion
