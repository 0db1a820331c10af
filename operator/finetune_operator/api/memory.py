"""Memory-fit estimate: the GPU memory each rank of a FineTuneJob needs, from the model's config.json
and the spec alone (no weights, no torch).

The operator's preflight and ``finetune plan`` call :func:`estimate` with the model's ``config.json``
(as a dict) and the job's spec; :meth:`MemoryEstimate.fits` compares the result with a GPU's memory
(``spec.resources.gpuMemory``: :func:`fits_spec`).

What the estimate models: the trainer as it runs today (transformers ``Trainer``, peft, bitsandbytes,
DeepSpeed), for Llama-family decoders: ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` configs, with
the causal-LM head (``sft``, ``pretrain``), a sequence-classification head (``classification``) or
the extractive-QA span head (``qa``). Another ``model_type`` raises :class:`UnsupportedModel`.

**Parameters** are listed tensor by tensor as transformers builds the model (embeddings, every
projection of every block, norms, biases where the config or the family has them, the head; a tied
head shares the embedding matrix), so counts are exact: Llama-2-7B has 6,738,415,616. The method then
decides which tensors train and adds its own: LoRA ``A``/``B`` matrices on the target modules
(``all-linear``: every projection of every block, not the head), DoRA magnitude vectors, AdaLoRA's
``A``/``E``/``B``, (IA)³ vectors, prefix-tuning and prompt-tuning embeddings, trainable copies of
``modulesToSave`` (and of the task head, which peft trains in full), and the rows of added tokens.

**Weights** are stored in the dtype the trainer holds them in: ``spec.model.dtype`` (``auto``: the
config's ``torch_dtype``), peft's adapters in fp32 (peft casts 16-bit adapter weights to fp32), under
QLoRA the block projections in 4 bits — packed two to a byte, one absmax per 64 weights (fp32, or
with double quantization one byte plus an fp32 second-level absmax per 256 blocks: 0.5 vs 0.127 bits
per weight, as the QLoRA paper states), with each tensor's code tables — and every other parameter in
fp32 (peft's ``prepare_model_for_kbit_training`` upcasts them). Under DeepSpeed with bf16/fp16 every
parameter is cast to that dtype, and the optimizer keeps an fp32 master copy of the trainable ones.

**Gradients**: one per trainable parameter, in its dtype.

**Optimizer states**: torch AdamW (``adamw``; fused): two states in the parameter's dtype and a
step counter per tensor; bitsandbytes 8-bit AdamW (``adamw8bit``, ``pagedAdamw8bit``): one byte per
state per element plus an fp32 absmax per 256 elements (tensors under 4096 elements keep fp32
states); ``pagedAdamw32bit``: two fp32 states (paged ones — tensors of 10^5 elements or more — can
be evicted to host memory under pressure; they are counted on the GPU and reported); ``sgd`` (the
Trainer's SGD, momentum 0): none; ``adafactor`` (no first moment, as the Trainer configures it):
factored row and column second moments of matrices, full ones of vectors, in fp32. Under DeepSpeed the
optimizer sees one flat fp32 partition per parameter group, and ZeRO partitions over the data-parallel
world: stage 1 the optimizer states and master copy, stage 2 also the gradients, stage 3 also the
parameters (the ZeRO paper's accounting: ``2Ψ + 2Ψ + 12Ψ`` bytes for mixed-precision Adam,
divided as the stage says); ``offloadOptimizer``/``offloadParams: cpu`` move them to host memory
(reported as :attr:`MemoryEstimate.host_bytes`). AdaLoRA's importance estimates (three fp32 copies
of its parameters) are counted with the optimizer.

**Activations**: the tensors autograd keeps for the backward pass, walked tensor by tensor through
the forward of a decoder block as transformers' code runs it, each op keeping what its backward
formula needs for the gradients it must compute (an input is kept only for the gradient of another
input that requires one, so a frozen bottom keeps nothing): RMSNorm's fp32 upcast and ``rsqrt``, the
input of every trainable linear (autocast's per-call 16-bit copy under mixed precision, and its copy
of every fp32 weight — the "+2 bytes a parameter" of fp32 weights with bf16 autocast), a LoRA
adapter's own fp32 copy of its input and its dropout mask (one byte an element on CUDA), DoRA's and
AdaLoRA's extra products (AdaLoRA's orthogonality regularizer too), (IA)³'s scaled tensors, the
attention kernel's saved set (``sdpa``/``flash_attention_2``: queries, keys, values, output and
log-sum-exp; with a padded or packed batch sdpa repeats grouped keys and values and keeps the mask as
an additive bias; ``eager``: the ``seq x seq`` scores in fp32 and in the compute dtype, and its dropout
mask), the SwiGLU intermediates — for a micro-batch of ``perDeviceBatchSize x maxSeqLength`` tokens
(the worst case: a batch whose longest sample is ``maxSeqLength``; prompt tuning adds its virtual
tokens, prefix tuning its keys and values). With gradient checkpointing every block keeps only its
input (and the rotary tables, position ids and mask stay with it), and one block is recomputed at a
time. Outside the blocks: the final norm, the head's input and the causal-LM loss, which upcasts the
logits to fp32: ``4 x tokens x vocab`` bytes kept, and ``8 x tokens x vocab`` more while the loss is
differentiated — the largest transient of a causal-LM step at large vocabularies. On the CPU the
kept bytes match a real forward pass exactly, for every method, dtype, attention kernel, batch
layout, head and checkpointing (tests/trainer/test_memory_measured.py).

**Peak**: weights and optimizer states live throughout. Activations peak at the start of the backward
pass (while the loss is differentiated) or in the top block's backward, before gradients exist (the
Trainer sets them to None after each step) unless they accumulate over micro-batches; gradients are
complete when the bottom block's backward runs and at the optimizer step, when activations are gone.
So the peak is ``weights + optimizer + max(activations [+ gradients when accumulating], gradients +
the bottom block's backward or the step's transients)``. A block's backward is modeled as two
gradients of its MLP intermediates and two of its input at once (with checkpointing, the recomputed
block and twice those); on the CPU the step peak lands within -5%/+15% of a real step's (most cases
within 3%). Then :data:`CUDA_CONTEXT_BYTES`, :data:`NCCL_BYTES` with more than one rank, and
:data:`FRAGMENTATION` of the allocated peak are added.

**Not counted**: temporary buffers inside kernels (flash-attention's and cuBLAS's workspaces beyond
the allowances), NCCL's buffers beyond the allowance, the evaluation pass (no gradients, so smaller
than a training step), DeepSpeed's buffers beyond those listed (the reduce bucket, ZeRO-3's gathered
block and prefetch bucket, the fp32 gradient partition of the step), CUDA graphs, and memory held by
other processes on the GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .tasks import Head, task_row
from .v1alpha1 import (
    AdaLoRAParams,
    FineTuneJobSpec,
    IA3Params,
    LoRAParams,
    PrefixParams,
    PreflightMemory,
    PromptParams,
    QuantizationParams,
)

GIB = 1024**3
MIB = 1024**2

#: The CUDA context and the kernels loaded into it, per process: not in ``torch.cuda.memory_allocated``
#: but occupying the GPU. Hugging Face's "Model training anatomy"
#: (https://huggingface.co/docs/transformers/model_memory_anatomy) measures 1343 MB used by a process
#: that has only moved a 1x1 tensor to a V100 ("the kernels alone take up 1.3GB"). Lazy module loading
#: (CUDA >= 11.7) defers kernels to their first use, which a training step makes of most of them, and
#: cuBLAS/cuBLASLt add their workspaces; the measured figure is taken as the allowance.
CUDA_CONTEXT_BYTES = 1343 * MIB
#: NCCL's communicator buffers when the job has more than one rank: per peer and channel a
#: ``NCCL_BUFFSIZE`` buffer (4 MiB by default), over up to tens of channels on NVLink systems.
NCCL_BYTES = GIB // 2
#: PyTorch's caching allocator reserves more than it hands out: blocks over 1 MiB are carved from
#: 2 MiB-or-larger segments and split blocks cannot always be reused for other sizes, so reserved
#: memory runs some percent above the allocated peak in a training loop. 10% of the allocated peak.
FRAGMENTATION = 0.10

DType = Literal["fp32", "bf16", "fp16"]
_SIZE: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1, "i64": 8}
_TORCH_DTYPES: dict[str, DType] = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}

#: bitsandbytes' 4-bit blockwise quantization (``Linear4bit``, as transformers configures it): one
#: absmax per this many weights; with double quantization the absmaxes are quantized to 8 bits in
#: blocks of :data:`QLORA_NESTED_BLOCK`, each with an fp32 absmax.
QLORA_BLOCK = 64
QLORA_NESTED_BLOCK = 256
#: Per quantized tensor: the 16-entry fp32 code table, and with double quantization the 256-entry
#: fp32 code of the nested quantization and an fp32 offset.
_QLORA_CODE_BYTES = 16 * 4
_QLORA_NESTED_CODE_BYTES = 256 * 4 + 4
#: bitsandbytes 8-bit optimizers: states of tensors below this many elements stay fp32; absmax block.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIMIZER_BLOCK = 256
#: bitsandbytes pages optimizer state of tensors with at least this many elements (if paged).
BNB_PAGED_MIN_SIZE = 100_000

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: peft's default (IA)³ target and feed-forward modules per model type
#: (``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and the feed-forward mapping).
_IA3_DEFAULT_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}
_IA3_DEFAULT_FEEDFORWARD = ("down_proj",)
#: The head layer of each head type, as transformers names it on Llama-family models.
_HEAD_MODULE: dict[Head, str] = {
    "causal-lm": "lm_head",
    "sequence-classification": "score",
    "reward": "score",
    "question-answering": "qa_outputs",
}


class UnsupportedModel(ValueError):
    """The config describes an architecture the estimator does not model."""


class EstimateError(ValueError):
    """The spec cannot be applied to this model (e.g. LoRA targets that match no module)."""


# --------------------------------------------------------------------------------------------------
# The architecture, from config.json
# --------------------------------------------------------------------------------------------------


def _require_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedModel(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-family decoder, read from its ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    #: Biases of the query, key and value projections (Qwen2 always; Llama and Qwen3 with
    #: ``attention_bias``), of the output projection (Llama with ``attention_bias``), of the MLP.
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    #: RMSNorm of each head's queries and keys (Qwen3).
    qk_norm: bool
    #: The checkpoint's dtype (``torch_dtype``/``dtype``), None when the config does not say.
    checkpoint_dtype: DType | None
    attention_dropout: float

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        """Read a transformers ``config.json`` (a dict). Defaults of missing optional keys are those of
        the model type's transformers config class."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"config.json: model_type {model_type!r} is not modeled (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        hidden = _require_int(config, "hidden_size")
        heads = _require_int(config, "num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
        attention_bias = bool(config.get("attention_bias", False))
        dtype_name = config.get("torch_dtype") or config.get("dtype")
        dtype = _TORCH_DTYPES.get(str(dtype_name).removeprefix("torch.")) if dtype_name else None
        return cls(
            model_type=model_type,
            vocab_size=_require_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require_int(config, "intermediate_size"),
            num_layers=_require_int(config, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            checkpoint_dtype=dtype,
            attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        )


# --------------------------------------------------------------------------------------------------
# Modules and parameters, as transformers names them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    """One module that holds parameters: a linear layer, an embedding or a norm."""

    name: str
    kind: Literal["linear", "embedding", "norm"]
    n_in: int
    n_out: int
    bias: bool = False
    #: The decoder block it belongs to, None outside the blocks.
    layer: int | None = None

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.kind == "linear":
            params: list[tuple[str, tuple[int, ...]]] = [(f"{self.name}.weight", (self.n_out, self.n_in))]
            if self.bias:
                params.append((f"{self.name}.bias", (self.n_out,)))
            return params
        if self.kind == "embedding":
            return [(f"{self.name}.weight", (self.n_in, self.n_out))]
        return [(f"{self.name}.weight", (self.n_out,))]


def modules(
    arch: Architecture, head: Head = "causal-lm", *, num_labels: int = 2, vocab: int | None = None
) -> list[Module]:
    """The model's parameter-holding modules in transformers' order, for ``head`` (the task's):
    ``*ForCausalLM``, ``*ForSequenceClassification`` (``num_labels`` outputs) or
    ``*ForQuestionAnswering``. ``vocab`` overrides the config's vocabulary size (added tokens)."""
    v = arch.vocab_size if vocab is None else vocab
    h, i = arch.hidden_size, arch.intermediate_size
    # The QA classes of Llama-family models name their base model `transformer` (base_model_prefix).
    base = "transformer" if head == "question-answering" else "model"
    out = [Module(f"{base}.embed_tokens", "embedding", v, h)]
    for n in range(arch.num_layers):
        p = f"{base}.layers.{n}"
        out += [
            Module(f"{p}.self_attn.q_proj", "linear", h, arch.q_dim, arch.qkv_bias, n),
            Module(f"{p}.self_attn.k_proj", "linear", h, arch.kv_dim, arch.qkv_bias, n),
            Module(f"{p}.self_attn.v_proj", "linear", h, arch.kv_dim, arch.qkv_bias, n),
            Module(f"{p}.self_attn.o_proj", "linear", arch.q_dim, h, arch.o_bias, n),
        ]
        if arch.qk_norm:
            out += [
                Module(f"{p}.self_attn.q_norm", "norm", arch.head_dim, arch.head_dim, layer=n),
                Module(f"{p}.self_attn.k_norm", "norm", arch.head_dim, arch.head_dim, layer=n),
            ]
        out += [
            Module(f"{p}.mlp.gate_proj", "linear", h, i, arch.mlp_bias, n),
            Module(f"{p}.mlp.up_proj", "linear", h, i, arch.mlp_bias, n),
            Module(f"{p}.mlp.down_proj", "linear", i, h, arch.mlp_bias, n),
            Module(f"{p}.input_layernorm", "norm", h, h, layer=n),
            Module(f"{p}.post_attention_layernorm", "norm", h, h, layer=n),
        ]
    out.append(Module(f"{base}.norm", "norm", h, h))
    if head == "causal-lm":
        out.append(Module("lm_head", "linear", h, v))
    elif head == "question-answering":
        out.append(Module("qa_outputs", "linear", h, 2, bias=True))
    else:
        out.append(Module("score", "linear", h, 1 if head == "reward" else num_labels))
    return out


def parameter_count(config: Mapping[str, Any], head: Head = "causal-lm", *, num_labels: int = 2) -> int:
    """The number of parameters of the model ``config`` describes (a tied head counted once)."""
    arch = Architecture.from_config(config)
    return sum(math.prod(shape) for _, shape in _base_parameters(arch, head, num_labels, arch.vocab_size))


def _base_parameters(arch: Architecture, head: Head, num_labels: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    params = [p for m in modules(arch, head, num_labels=num_labels, vocab=vocab) for p in m.parameters()]
    if head == "causal-lm" and arch.tie_word_embeddings:
        params = [p for p in params if p[0] != "lm_head.weight"]  # the embedding matrix, counted once
    return params


# --------------------------------------------------------------------------------------------------
# Which tensors the trainer holds, in which dtype, and which of them train
# --------------------------------------------------------------------------------------------------

Storage = Literal["fp32", "bf16", "fp16", "nf4", "fp4"]


@dataclass(frozen=True)
class Tensor:
    """A parameter tensor as the trainer holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: Storage
    trainable: bool
    #: ``base`` (the pretrained model), ``adapter`` (a PEFT method's own), ``copy`` (peft's trained copy
    #: of a module to save), ``added`` (trained rows of added tokens).
    role: Literal["base", "adapter", "copy", "added"] = "base"
    double_quant: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor on the device, with a 4-bit tensor's quantization constants."""
        if self.dtype in ("nf4", "fp4"):
            return quantized_bytes(self.numel, double_quant=self.double_quant)
        return self.numel * _SIZE[self.dtype]


def quantized_bytes(numel: int, *, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit tensor of ``numel`` weights: two weights a byte, the absmax of
    every :data:`QLORA_BLOCK` weights (fp32; with double quantization one byte, plus an fp32 absmax per
    :data:`QLORA_NESTED_BLOCK` blocks), and the code tables."""
    blocks = math.ceil(numel / QLORA_BLOCK)
    packed = (numel + 1) // 2
    if double_quant:
        return (
            packed + blocks + 4 * math.ceil(blocks / QLORA_NESTED_BLOCK) + _QLORA_CODE_BYTES + _QLORA_NESTED_CODE_BYTES
        )
    return packed + 4 * blocks + _QLORA_CODE_BYTES


def _teacher_bytes(arch: Architecture, spec: FineTuneJobSpec, *, vocab: int) -> int:
    """Bytes of a distillation teacher's weights: in spec.model.dtype (the checkpoint's for auto), or
    with ``teacherQuantization`` its decoder layers' linear weights in 4 bits (double-quantized, as the
    recipe loads it; embeddings, norms and the LM head stay in that dtype, as transformers keeps them)."""
    distill = spec.task.distill
    quantized = distill is not None and distill.teacher_quantization != "none"
    size = _SIZE[_weights_dtype(spec, arch)]
    total = 0
    for name, shape in _base_parameters(arch, "causal-lm", 2, max(arch.vocab_size, vocab)):
        numel = math.prod(shape)
        linear = ".layers." in f".{name}" and len(shape) == 2
        total += quantized_bytes(numel, double_quant=True) if quantized and linear else numel * size
    return total


def _weights_dtype(spec: FineTuneJobSpec, arch: Architecture) -> DType:
    requested = spec.model.dtype
    if requested == "auto":
        return arch.checkpoint_dtype or "fp32"
    return requested


def _mixed_precision(spec: FineTuneJobSpec, bf16_supported: bool) -> DType | None:
    """The 16-bit dtype of mixed precision, None for fp32 training (precision ``auto``: bf16 where the
    accelerator supports it, else fp32, as the trainer resolves it)."""
    p = spec.training.precision
    if p == "auto":
        return "bf16" if bf16_supported else None
    return None if p == "fp32" else p


def _matches_target(name: str, targets: list[str]) -> bool:
    """peft's target matching for a list of names: the module name or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass(frozen=True)
class _Site:
    """A linear layer as the activation walk sees it."""

    module: Module
    weight_dtype: Storage
    trainable: bool
    lora_rank: int = 0
    lora_dtype: DType = "fp32"
    dora: bool = False
    #: AdaLoRA's SVD form (``x @ (A * E).T @ B.T / ranknum``); ``ranknum_trained``: its counter trains.
    adalora: bool = False
    ranknum_trained: bool = False
    ia3: Literal["none", "output", "input"] = "none"


@dataclass
class _Plan:
    """The tensors of the tuned model and what the activation walk needs to know."""

    tensors: list[Tensor]
    sites: dict[str, _Site]
    #: Norm modules whose weight trains.
    trained_norms: set[str]
    embedding_trainable: bool
    #: Extra positions every sequence gets (prompt tuning) and extra keys every layer attends to (prefix).
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    #: AdaLoRA keeps three fp32 importance estimates of each of its matrices.
    adalora_importance_numel: int = 0
    lora_dropout: float = 0.0
    notes: list[str] = field(default_factory=list)

    def first_trained_layer(self, num_layers: int) -> int:
        """The first decoder block that keeps activations: 0 when anything below the blocks trains."""
        if self.embedding_trainable or self.prompt_tokens or self.prefix_tokens:
            return 0
        layers = [s.module.layer for s in self.sites.values() if s.module.layer is not None and _site_trains(s)]
        layers += [int(m.group(1)) for name in self.trained_norms if (m := re.search(r"\.layers\.(\d+)\.", name))]
        return min(layers) if layers else num_layers


def _site_trains(site: _Site) -> bool:
    return site.trainable or site.lora_rank > 0 or site.ia3 != "none"


def _plan(
    arch: Architecture,
    spec: FineTuneJobSpec,
    *,
    vocab: int,
    added_rows: int,
    mixed: DType | None,
    deepspeed_cast: bool,
) -> _Plan:
    head = task_row(spec.task.type).head
    num_labels = spec.task.classification.num_labels if spec.task.classification is not None else 2
    mods = modules(arch, head, num_labels=num_labels, vocab=vocab)
    by_name = {m.name: m for m in mods}
    method = spec.method.type
    base_dtype: DType = _weights_dtype(spec, arch)
    peft = method != "full"
    head_module = by_name[_HEAD_MODULE[head]]
    embed = mods[0]
    tied = head == "causal-lm" and arch.tie_word_embeddings

    # 4-bit: every linear of the blocks (transformers keeps the head, the last module, unquantized).
    quant = (spec.method.quantization or QuantizationParams()) if method == "qlora" else None
    quantized = {m.name for m in mods if quant is not None and m.kind == "linear" and m.layer is not None}
    # QLoRA's k-bit preparation upcasts every parameter that is not 4-bit to fp32.
    plain_dtype: DType = "fp32" if quant is not None else base_dtype

    trainable: set[str] = set()  # parameter names
    if method == "full":
        trainable = {n for m in mods for n, _ in m.parameters()}
        freeze = spec.method.freeze
        if freeze is not None:
            if freeze.head_only or freeze.last_layers is not None:
                trainable = set()
            if freeze.head_only:
                trainable |= {n for n, _ in (embed if tied else head_module).parameters()}
            if freeze.last_layers is not None:
                if freeze.last_layers > arch.num_layers:
                    raise EstimateError(
                        f"spec.method.freeze.lastLayers is {freeze.last_layers} "
                        f"but the model has {arch.num_layers} blocks"
                    )
                first = arch.num_layers - freeze.last_layers
                for m in mods:
                    if (m.layer is not None and m.layer >= first) or (m.layer is None and m.kind != "embedding"):
                        trainable |= {n for n, _ in m.parameters()}
            for pattern in freeze.patterns:
                regex = re.compile(pattern)
                trainable = {n for n in trainable if not regex.search(n)}
            if not trainable:
                raise EstimateError("spec.method.freeze leaves no parameter to train")

    tensors: list[Tensor] = []
    for m in mods:
        for n, shape in m.parameters():
            if n == "lm_head.weight" and tied:
                continue
            dtype: Storage = plain_dtype
            if m.name in quantized and n.endswith(".weight"):
                assert quant is not None
                dtype = quant.quant_type
            tensors.append(
                Tensor(n, shape, dtype, n in trainable, double_quant=quant is not None and quant.double_quant)
            )

    adapter_dtype: DType = "fp32"  # peft casts 16-bit adapter weights to fp32
    lora_ranks: dict[str, int] = {}
    dora = False
    ia3_sites: dict[str, Literal["output", "input"]] = {}
    plan_notes: list[str] = []
    prompt_tokens = prefix_tokens = 0
    adalora_numel = 0
    lora_dropout = 0.0

    if method in ("lora", "qlora", "adalora"):
        lora = spec.method.lora or LoRAParams()
        lora_dropout = lora.dropout
        linears = [m for m in mods if m.kind == "linear"]
        if lora.target_modules == ["all-linear"]:
            targets = [m for m in linears if m is not head_module]
        else:
            targets = [m for m in linears if _matches_target(m.name, list(lora.target_modules))]
            if head == "question-answering" and head_module in targets:
                raise EstimateError(
                    "spec.method.lora.targetModules: qa_outputs is the span head of spec.task.type qa, trained in full"
                )
        if not targets:
            raise EstimateError(
                f"spec.method.lora.targetModules {list(lora.target_modules)} match no module "
                f"of this {arch.model_type} model"
            )
        if method == "adalora":
            ada = spec.method.adalora or AdaLoRAParams()
            r = ada.init_r
            for m in targets:
                lora_ranks[m.name] = r
                tensors += [
                    Tensor(f"{m.name}.lora_A", (r, m.n_in), adapter_dtype, True, "adapter"),
                    Tensor(f"{m.name}.lora_E", (r, 1), adapter_dtype, True, "adapter"),
                    Tensor(f"{m.name}.lora_B", (m.n_out, r), adapter_dtype, True, "adapter"),
                    # peft re-creates the rank counter when it upcasts 16-bit adapters, and then it trains.
                    Tensor(f"{m.name}.ranknum", (1,), adapter_dtype, base_dtype != "fp32", "adapter"),
                ]
                adalora_numel += r * m.n_in + r + m.n_out * r
        else:
            r = lora.rank
            dora = lora.use_dora
            for m in targets:
                lora_ranks[m.name] = r
                tensors += [
                    Tensor(f"{m.name}.lora_A.weight", (r, m.n_in), adapter_dtype, True, "adapter"),
                    Tensor(f"{m.name}.lora_B.weight", (m.n_out, r), adapter_dtype, True, "adapter"),
                ]
                if dora:
                    tensors.append(
                        Tensor(f"{m.name}.lora_magnitude_vector", (m.n_out,), adapter_dtype, True, "adapter")
                    )
        if lora.bias != "none":
            biased = {m.name for m in targets} if lora.bias == "lora_only" else {m.name for m in linears}
            tensors = [
                Tensor(t.name, t.shape, t.dtype, True, t.role, t.double_quant)
                if t.name.endswith(".bias") and t.name.removesuffix(".bias") in biased
                else t
                for t in tensors
            ]
        to_save = list(lora.modules_to_save)
    elif method == "ia3":
        ia3 = spec.method.ia3 or IA3Params()
        targets_names = list(ia3.target_modules or _IA3_DEFAULT_TARGETS[arch.model_type])
        feedforward = list(ia3.feedforward_modules or _IA3_DEFAULT_FEEDFORWARD)
        for m in mods:
            if m.kind == "linear" and m is not head_module and _matches_target(m.name, targets_names):
                is_ff = _matches_target(m.name, feedforward)
                ia3_sites[m.name] = "input" if is_ff else "output"
                shape = (1, m.n_in) if is_ff else (m.n_out, 1)
                tensors.append(Tensor(f"{m.name}.ia3_l", shape, adapter_dtype, True, "adapter"))
        if not ia3_sites:
            raise EstimateError(f"spec.method.ia3.targetModules match no module of this {arch.model_type} model")
        to_save = []
    elif method == "prefix":
        params = spec.method.prefix or PrefixParams()
        prefix_tokens = params.num_virtual_tokens
        token_dim = arch.kv_dim  # peft sizes the prefix for grouped-query attention: kv heads x head_dim
        width = arch.num_layers * 2 * token_dim
        if params.projection:
            tensors += [
                Tensor("prompt_encoder.embedding.weight", (prefix_tokens, token_dim), adapter_dtype, True, "adapter"),
                Tensor(
                    "prompt_encoder.transform.0.weight", (arch.hidden_size, token_dim), adapter_dtype, True, "adapter"
                ),
                Tensor("prompt_encoder.transform.0.bias", (arch.hidden_size,), adapter_dtype, True, "adapter"),
                Tensor("prompt_encoder.transform.2.weight", (width, arch.hidden_size), adapter_dtype, True, "adapter"),
                Tensor("prompt_encoder.transform.2.bias", (width,), adapter_dtype, True, "adapter"),
            ]
        else:
            tensors.append(
                Tensor("prompt_encoder.embedding.weight", (prefix_tokens, width), adapter_dtype, True, "adapter")
            )
        to_save = []
    elif method == "prompt":
        prompt_tokens = (spec.method.prompt or PromptParams()).num_virtual_tokens
        tensors.append(
            Tensor("prompt_encoder.embedding.weight", (prompt_tokens, arch.hidden_size), adapter_dtype, True, "adapter")
        )
        to_save = []
    else:
        to_save = []

    if peft:
        # peft trains a task head other than the LM head in full, as a copy (SEQ_CLS, QUESTION_ANS).
        if head != "causal-lm":
            to_save = [*to_save, _HEAD_MODULE[head]]
        saved_modules = [m for m in mods if any(m.name.endswith(t) for t in to_save)]
        for m in saved_modules:
            for n, shape in m.parameters():
                if n == "lm_head.weight" and tied:
                    plan_notes.append("modulesToSave of a tied head copies the shared embedding matrix")
                tensors.append(Tensor(f"{n}.copy", shape, plain_dtype, True, "copy"))
        # Rows of added tokens train as deltas beside the frozen embeddings (and an untied head).
        embedding_saved = embed in saved_modules
        if added_rows and not embedding_saved:
            tensors.append(
                Tensor("added_token_rows.input_delta", (added_rows, arch.hidden_size), plain_dtype, True, "added")
            )
            if head == "causal-lm" and not tied:
                tensors.append(
                    Tensor("added_token_rows.output_delta", (added_rows, arch.hidden_size), plain_dtype, True, "added")
                )
    elif added_rows and not any(t.trainable for t in tensors if t.name == f"{embed.name}.weight"):
        tensors.append(
            Tensor("added_token_rows.input_delta", (added_rows, arch.hidden_size), plain_dtype, True, "added")
        )
        if head == "causal-lm" and not tied:
            tensors.append(
                Tensor("added_token_rows.output_delta", (added_rows, arch.hidden_size), plain_dtype, True, "added")
            )

    if deepspeed_cast and mixed is not None:
        # DeepSpeed casts every floating parameter to the 16-bit dtype (4-bit ones stay packed).
        tensors = [
            Tensor(t.name, t.shape, mixed, t.trainable, t.role) if t.dtype not in ("nf4", "fp4") else t for t in tensors
        ]
        adapter_dtype = mixed
        plain_dtype = mixed

    trained = {t.name for t in tensors if t.trainable}
    copies = {t.name.removesuffix(".copy") for t in tensors if t.role == "copy"}
    dtypes = {t.name: t.dtype for t in tensors}
    sites: dict[str, _Site] = {}
    for m in mods:
        if m.kind != "linear":
            continue
        w = f"{m.name}.weight"
        weight_dtype = dtypes.get(w) or dtypes[f"{embed.name}.weight"]  # a tied head's weight is the embedding's
        sites[m.name] = _Site(
            module=m,
            weight_dtype=weight_dtype,
            trainable=w in trained or (tied and m is head_module and f"{embed.name}.weight" in trained) or w in copies,
            lora_rank=lora_ranks.get(m.name, 0),
            lora_dtype=adapter_dtype,
            dora=dora and m.name in lora_ranks,
            adalora=method == "adalora" and m.name in lora_ranks,
            ranknum_trained=method == "adalora" and base_dtype != "fp32",
            ia3=ia3_sites.get(m.name, "none"),
        )
    trained_norms = {m.name for m in mods if m.kind == "norm" and (f"{m.name}.weight" in trained | copies)}
    embedding_trainable = f"{embed.name}.weight" in trained | copies
    return _Plan(
        tensors=tensors,
        sites=sites,
        trained_norms=trained_norms,
        embedding_trainable=embedding_trainable,
        prompt_tokens=prompt_tokens,
        prefix_tokens=prefix_tokens,
        adalora_importance_numel=adalora_numel,
        lora_dropout=lora_dropout,
        notes=plan_notes,
    )


# --------------------------------------------------------------------------------------------------
# Activations: the tensors autograd keeps, walked through the forward of a block
# --------------------------------------------------------------------------------------------------

AttentionKernel = Literal["eager", "sdpa", "flash_attention_2"]


def _promote(a: str, b: str) -> str:
    """torch's type promotion between two floating dtypes."""
    return a if a == b else "fp32"


@dataclass(frozen=True)
class _Act:
    """An activation tensor: ``width`` elements per token of the micro-batch; ``grad``: it requires a
    gradient (autograd records the ops it flows through)."""

    ident: int
    width: float
    dtype: str
    grad: bool


class _Ledger:
    """What a forward pass allocates and what autograd keeps of it: bytes per token, plus bytes that do
    not scale with tokens (16-bit copies of fp32 weights made by autocast, DoRA's and AdaLoRA's
    matrices). Each op saves what its backward formula needs for the gradients it has to compute, as
    torch's autograd does: an input is kept only for the gradient of another input that requires one."""

    def __init__(self) -> None:
        self._count = 0
        self.saved: dict[int, float] = {}
        self.fixed = 0

    def new(self, width: float, dtype: str, grad: bool) -> _Act:
        self._count += 1
        return _Act(self._count, width, dtype, grad)

    def cast(self, t: _Act, dtype: str) -> _Act:
        """``t.to(dtype)``: the tensor itself when it has that dtype already, else a new one."""
        return t if t.dtype == dtype else self.new(t.width, dtype, t.grad)

    def save(self, t: _Act, when: bool = True) -> None:
        if when:
            self.saved[t.ident] = t.width * _SIZE[t.dtype]

    def keep(self, nbytes: int, when: bool = True) -> None:
        """A saved tensor whose size does not scale with the tokens."""
        if when:
            self.fixed += nbytes

    @property
    def per_token(self) -> float:
        return sum(self.saved.values())


@dataclass(frozen=True)
class _Numerics:
    #: The autocast dtype of mixed precision (the Trainer's bf16/fp16 without DeepSpeed), else None.
    autocast: str | None
    #: The dtype of the residual stream (the embeddings' output).
    residual: str
    #: The dtype 4-bit layers compute in (QLoRA's computeDtype).
    compute: str
    lora_dropout: float
    attention_dropout: float
    #: CUDA's fused dropout keeps a bool mask; the CPU's keeps it in the input's dtype.
    cpu: bool = False

    def mask(self, of: _Act) -> str:
        return of.dtype if self.cpu else "u8"


def _rmsnorm(led: _Ledger, x: _Act, groups: int, trained: bool, weight_dtype: str) -> _Act:
    """Llama's RMSNorm: upcast to fp32, ``x * rsqrt(mean(x^2) + eps)``, back to x's dtype, times the weight."""
    x32 = led.cast(x, "fp32")
    led.save(x32, x.grad)  # by pow and by the multiplication with rsqrt
    led.save(led.new(groups, "fp32", x.grad), x.grad)  # rsqrt: one per token (per head for q_norm/k_norm)
    normed = led.cast(led.new(x.width, "fp32", x.grad), x.dtype)
    led.save(normed, trained)  # for the weight's gradient
    return led.new(x.width, _promote(weight_dtype, x.dtype), x.grad or trained)


def _linear(led: _Ledger, x: _Act, site: _Site, num: _Numerics) -> _Act:
    """One linear layer: the base layer (plain, autocast, or bitsandbytes 4-bit), then its adapter."""
    m = site.module
    ac = num.autocast
    if site.ia3 == "input":  # (IA)³ of a feed-forward layer scales its input (in the vector's fp32)
        x32 = led.cast(x, "fp32")
        led.save(x32)  # for the vector's gradient
        led.keep(4 * m.n_in, x.grad)  # the scaling vector (a product of the adapters'), for x's gradient
        x = led.new(m.n_in, x.dtype, True)
    if site.weight_dtype in ("nf4", "fp4"):
        # Linear4bit casts the input to the compute dtype; MatMul4Bit keeps only the packed weight, and
        # the compute-dtype copy of a bias stays referenced with it.
        out = led.cast(led.new(m.n_out, num.compute, x.grad), x.dtype)
        if m.bias:
            led.keep(m.n_out * _SIZE[num.compute])
    elif ac is not None:
        xin = led.cast(x, ac)  # autocast's copy, made per call
        led.save(xin, site.trainable)  # for the weight's gradient
        if site.weight_dtype != ac:
            led.keep(m.n_in * m.n_out * _SIZE[ac], x.grad)  # the weight's 16-bit copy, for x's gradient
        out = led.new(m.n_out, ac, x.grad or site.trainable)
    else:
        led.save(x, site.trainable)
        out = led.new(m.n_out, _promote(x.dtype, site.weight_dtype), x.grad or site.trainable)
    if site.ia3 == "output":  # (IA)³ of an attention projection scales its output
        led.save(out)  # for the vector's gradient
        led.keep(4 * m.n_out, out.grad)  # the scaling vector, for the output's gradient
        out = led.cast(led.new(m.n_out, _promote(out.dtype, "fp32"), True), out.dtype)
    if not site.lora_rank:
        return out
    r, da = site.lora_rank, site.lora_dtype
    xa = led.cast(x, da)  # peft casts the input to the adapter's dtype
    if num.lora_dropout > 0:
        led.save(led.new(m.n_in, num.mask(xa), x.grad), x.grad)  # the dropout mask
        xa = led.new(m.n_in, da, x.grad)
    a_in = xa if ac is None else led.cast(xa, ac)  # autocast's copy
    mid_dtype = da if ac is None else ac
    copies = ac is not None and da != ac  # autocast keeps 16-bit copies of the fp32 adapter matrices
    led.save(a_in)  # the first matmul's input, for A's gradient
    led.save(led.new(r, mid_dtype, True))  # the second one's, for B's gradient
    if site.adalora:
        # x @ (A * E).T @ B.T * scaling / (ranknum + eps): (A * E) is a new matrix, kept for x's gradient.
        e = 4 if ac is None else _SIZE[ac]
        led.keep(r * m.n_in * e, x.grad)
        if ac is not None:
            # autocast's copies: of B.T for the adapter; of A, A.T, B.T and B for the orthogonality
            # regularizer ||A A^T - I|| + ||B^T B - I|| that AdaLoRA adds to the loss
            led.keep((2 * m.n_in + 3 * m.n_out) * r * e)
        led.keep(2 * r * r * e + 2 * e + 4)  # the regularizer's P P^T - I and norms; ranknum + eps
        led.save(led.new(m.n_out, mid_dtype, True), site.ranknum_trained)  # the numerator, for ranknum's
    elif copies:
        assert ac is not None
        led.keep(r * m.n_in * _SIZE[ac], x.grad)  # A's copy, for x's gradient
        led.keep(r * m.n_out * _SIZE[ac])  # B's copy, for the middle's gradient
    if site.dora:
        # The (detached) weight norm ||W + BA|| is kept by the division of the magnitudes, and
        # (m / norm - 1) * base_result + m / norm * lora_result keeps both results and the scales.
        led.keep(2 * m.n_out * 4)
        led.keep(m.n_out * 4, out.grad)
        if num.lora_dropout > 0:
            # The base result is recomputed from the dropped-out input and a copy of the weight.
            led.keep(m.n_in * m.n_out * _SIZE[mid_dtype], x.grad)
            led.save(led.new(m.n_out, mid_dtype, True))
        else:
            led.save(out)
        led.save(led.new(m.n_out, mid_dtype, True))
    return led.new(m.n_out, out.dtype, True)


def _matmul(led: _Ledger, a: _Act, b: _Act, c: str) -> None:
    """``a @ b`` computed in dtype ``c`` (autocast casts both): each is kept for the other's gradient."""
    led.save(led.cast(a, c), b.grad)
    led.save(led.cast(b, c), a.grad)


def _attention(
    led: _Ledger,
    q: _Act,
    k: _Act,
    v: _Act,
    arch: Architecture,
    num: _Numerics,
    kernel: AttentionKernel,
    masked: bool,
    keys: int,
) -> _Act:
    """The attention kernel's saved set for one query token, which attends to ``keys`` positions."""
    n_rep = arch.num_heads // arch.num_kv_heads
    scores = arch.num_heads * keys  # per query token: one per head and key
    grad = q.grad or k.grad or v.grad
    c = num.autocast or q.dtype
    if kernel == "eager":
        k_rep = led.new(k.width * n_rep, k.dtype, k.grad) if n_rep > 1 else k
        v_rep = led.new(v.width * n_rep, v.dtype, v.grad) if n_rep > 1 else v
        _matmul(led, q, k_rep, c)
        probs32 = led.new(scores, "fp32", q.grad or k.grad)  # softmax(scores, dtype=fp32) keeps its output
        led.save(probs32, probs32.grad)
        probs = led.cast(probs32, q.dtype)
        if num.attention_dropout > 0:
            led.save(led.new(scores, num.mask(probs), probs.grad), probs.grad)
            probs = led.new(scores, probs.dtype, probs.grad)
        _matmul(led, probs, v_rep, c)
        return led.new(arch.q_dim, c, grad)  # transpose(1, 2).contiguous(): a copy
    if kernel == "sdpa" and masked and n_rep > 1:  # with a mask, transformers repeats grouped keys/values
        k = led.new(k.width * n_rep, k.dtype, k.grad)
        v = led.new(v.width * n_rep, v.dtype, v.grad)
    for t in (q, k, v):
        led.save(led.cast(t, c), grad)
    out = led.new(arch.q_dim, c, grad)  # laid out (batch, seq, heads, head_dim): transpose and reshape are views
    led.save(out, grad)
    led.save(led.new(arch.num_heads, "fp32", grad), grad)  # log-sum-exp per query and head
    if kernel == "sdpa" and masked:
        led.save(led.new(keys, c, False), grad)  # the mask, as an additive bias (batch, 1, seq, keys)
    return out


def _block(
    led: _Ledger,
    arch: Architecture,
    plan: _Plan,
    layer: int,
    base: str,
    num: _Numerics,
    kernel: AttentionKernel,
    masked: bool,
    seq: int,
    keys: int,
    input_grad: bool,
) -> bool:
    """One decoder block's forward, as transformers' Llama/Mistral/Qwen2/Qwen3 code runs it, from an input
    that requires a gradient or not; returns whether the rotary embedding kept its cos and sin tables
    (for queries or keys that require a gradient)."""
    p = f"{base}.layers.{layer}"
    s = {name.rsplit(".", 1)[-1]: site for name, site in plan.sites.items() if name.startswith(p + ".")}
    norm_dtype = _norm_dtype(plan, f"{p}.input_layernorm")
    x = led.new(arch.hidden_size, num.residual, input_grad)
    h = _rmsnorm(led, x, 1, f"{p}.input_layernorm" in plan.trained_norms, norm_dtype)
    q = _linear(led, h, s["q_proj"], num)
    k = _linear(led, h, s["k_proj"], num)
    v = _linear(led, h, s["v_proj"], num)
    if arch.qk_norm:
        q = _rmsnorm(led, q, arch.num_heads, f"{p}.self_attn.q_norm" in plan.trained_norms, norm_dtype)
        k = _rmsnorm(led, k, arch.num_kv_heads, f"{p}.self_attn.k_norm" in plan.trained_norms, norm_dtype)
    # Rotary embedding: q * cos + rotate_half(q) * sin keeps cos and sin only (shared by all blocks).
    rotary = q.grad or k.grad
    q = led.new(q.width, _promote(q.dtype, num.residual), q.grad)
    k = led.new(k.width, _promote(k.dtype, num.residual), k.grad)
    if keys != seq:  # prefix tuning: the trained prefix is concatenated in front of keys and values
        k = led.new(k.width * keys / seq, k.dtype, True)
        v = led.new(v.width * keys / seq, v.dtype, True)
    attn = _attention(led, q, k, v, arch, num, kernel, masked, keys)
    o = _linear(led, attn, s["o_proj"], num)
    x2 = led.new(arch.hidden_size, _promote(num.residual, o.dtype), x.grad or o.grad)
    h2 = _rmsnorm(led, x2, 1, f"{p}.post_attention_layernorm" in plan.trained_norms, norm_dtype)
    g = _linear(led, h2, s["gate_proj"], num)
    u = _linear(led, h2, s["up_proj"], num)
    led.save(g, g.grad)  # by silu
    act = led.new(g.width, g.dtype, g.grad)
    led.save(act, u.grad)  # by the product with up, for up's gradient
    led.save(u, act.grad)  # and for silu's
    _linear(led, led.new(g.width, _promote(act.dtype, u.dtype), act.grad or u.grad), s["down_proj"], num)
    return rotary


def _norm_dtype(plan: _Plan, name: str) -> str:
    for t in plan.tensors:
        if t.name == f"{name}.weight":
            return t.dtype
    raise KeyError(name)


@dataclass(frozen=True)
class Activations:
    """Activation memory of one micro-batch on one rank, in bytes."""

    tokens: int
    #: What one decoder block keeps for the backward pass (with checkpointing: while it is recomputed).
    block: int
    #: What the first block that trains keeps: less than ``block`` when nothing below it trains (autograd
    #: records its ops only from the first trainable one on).
    first_block: int
    #: Blocks that keep activations (those at or above the first block that trains).
    blocks: int
    #: Kept outside the blocks: input ids, rotary tables, masks, final norm, head input, fp32
    #: log-probabilities, labels, the loss.
    outer: int
    #: With gradient checkpointing, the block inputs kept instead of the blocks' activations.
    checkpoints: int
    #: The part of :attr:`kept` that does not scale with the tokens: autocast's 16-bit copies of fp32
    #: weights (the ``+2 bytes`` of mixed precision with fp32 weights) and adapters' own matrices.
    fixed: int
    #: Differentiating the loss: ``8 x tokens x vocab`` bytes for a causal LM (the fp32 gradients of the
    #: log-probabilities and of the logits), while everything else is still kept.
    loss_transient: int
    #: A block's backward pass: the gradients of its MLP intermediates and of its input (with gradient
    #: checkpointing also the forward intermediates of the block being recomputed).
    block_transient: int
    gradient_checkpointing: bool

    @property
    def kept(self) -> int:
        """What the forward pass leaves for the backward pass."""
        if self.gradient_checkpointing:
            return self.checkpoints + self.outer
        if not self.blocks:
            return self.outer
        return self.first_block + (self.blocks - 1) * self.block + self.outer

    @property
    def peak(self) -> int:
        """The activation peak of a step: at the loss, or in the backward pass of the top block (with
        gradient checkpointing: while it is recomputed)."""
        block = self.block + self.block_transient if self.gradient_checkpointing else self.block_transient
        return self.kept + max(self.loss_transient, block)

    @property
    def at_last_block(self) -> int:
        """What the backward pass of the bottom block adds to the (almost complete) gradients."""
        return self.block if self.gradient_checkpointing else self.block_transient


def _activations(
    arch: Architecture,
    plan: _Plan,
    spec: FineTuneJobSpec,
    num: _Numerics,
    *,
    vocab: int,
    kernel: AttentionKernel,
    input_grad: bool,
) -> Activations:
    """``input_grad``: whether the embeddings' output requires a gradient (something below the blocks
    trains, or k-bit preparation made it so for gradient checkpointing)."""
    head = task_row(spec.task.type).head
    base = "transformer" if head == "question-answering" else "model"
    # DPO forwards a pair's chosen and rejected rows in one batch (finetune_trainer.recipes.dpo).
    batch = spec.training.per_device_batch_size * (2 if spec.task.type == "dpo" else 1)
    seq = spec.data.max_seq_length + plan.prompt_tokens
    if spec.task.type == "rl" and spec.task.rl is not None:
        # Online RL trains on a prompt (at most maxSeqLength tokens) and its generated completion.
        seq += spec.task.rl.max_new_tokens
    tokens = batch * seq
    packing = spec.data.packing
    # sdpa gets a mask from padded (batch > 1) or packed rows; a single unpadded row runs causal, maskless.
    masked = kernel == "eager" or batch > 1 or packing
    keys = seq + plan.prefix_tokens
    gc = spec.training.gradient_checkpointing
    first = plan.first_trained_layer(arch.num_layers)
    active = arch.num_layers - first
    res = _SIZE[num.residual]

    block = first_block = block_fixed = first_fixed = 0
    below = input_grad or plan.embedding_trainable or bool(plan.prompt_tokens)  # the first block's input
    rotary = False
    if active:
        led = _Ledger()
        _block(led, arch, plan, first, base, num, kernel, masked, seq, keys, True)
        block = math.ceil(led.per_token * tokens) + led.fixed
        block_fixed = led.fixed
        led = _Ledger()
        rotary = _block(led, arch, plan, first, base, num, kernel, masked, seq, keys, below)
        first_block = math.ceil(led.per_token * tokens) + led.fixed
        first_fixed = led.fixed
        rotary = rotary or active > 1

    outer = 0
    if plan.embedding_trainable:
        outer += 8 * tokens  # the embedding keeps its input ids
    rows = batch if packing else 1  # position ids (and so rotary tables) are per row only when packed
    if rotary:
        outer += 2 * rows * seq * arch.head_dim * res  # cos and sin
    checkpoints = 0
    if gc:
        # Every checkpointed block keeps its input; its other arguments stay alive with it: the position
        # ids, and the mask of a padded or packed batch.
        checkpoints = arch.num_layers * tokens * arch.hidden_size * res
        outer += 8 * rows * seq
        if masked:
            outer += batch * seq * keys * (res if kernel == "eager" else 1)
    tail = _Ledger()
    final = f"{base}.norm"
    x = tail.new(arch.hidden_size, num.residual, bool(active) or below)
    h = _rmsnorm(tail, x, 1, final in plan.trained_norms, _norm_dtype(plan, final))
    head_site = plan.sites[_HEAD_MODULE[head]]
    _linear(tail, h, head_site, num)
    outer += math.ceil(tail.per_token * tokens) + tail.fixed + 4  # and the loss itself
    if head == "causal-lm":
        # fp32 log-probabilities; the shifted labels (a view of the padded labels for a single row)
        outer += 4 * tokens * vocab + 8 * (seq + 1 if batch == 1 else tokens) + 4
        transient = 8 * tokens * vocab  # the loss's gradient and log-softmax's input gradient, in fp32
    elif head == "question-answering":
        # log-softmax over the positions of the start and of the end logits, their targets, two losses
        outer += 2 * (4 * tokens + 8 * batch + 4)
        transient = 8 * tokens
    else:
        # the log-softmax of each row's last-token logits, the indices of those tokens, a normalizer
        outer += 4 * batch * head_site.module.n_out + 2 * 8 * batch + 4
        transient = 8 * batch * head_site.module.n_out
    # A block's backward holds gradients of its MLP intermediates (two at a time, of intermediate_size)
    # and of its input; recomputing a checkpointed block adds its forward intermediates: twice as many.
    # Gradients through fp32 adapters or an fp32 residual stream are fp32. Checked against CPU runs
    # (tests/trainer/test_memory_estimate.py), where the measured block transients stay below these.
    g = 4 if num.residual == "fp32" or any(s.lora_rank or s.ia3 != "none" for s in plan.sites.values()) else res
    block_backward = tokens * ((4 if gc else 2) * arch.intermediate_size * g + 2 * arch.hidden_size * g)
    dora = [s.module for s in plan.sites.values() if s.dora]
    if dora:  # DoRA materializes B @ A, the weight copy and their sum to take column norms
        block_backward = max(block_backward, 3 * max(m.n_in * m.n_out for m in dora) * 4)
    return Activations(
        tokens=tokens,
        block=block,
        first_block=first_block,
        blocks=active,
        outer=outer,
        checkpoints=checkpoints,
        fixed=tail.fixed + (0 if gc or not active else first_fixed + (active - 1) * block_fixed),
        loss_transient=transient,
        block_transient=block_backward if active else 0,
        gradient_checkpointing=gc,
    )


# --------------------------------------------------------------------------------------------------
# Optimizer states, gradients and ZeRO partitioning
# --------------------------------------------------------------------------------------------------


def _state_bytes(numel: int, shape: tuple[int, ...], dtype: str, optimizer: str) -> tuple[int, int]:
    """Bytes of one tensor's optimizer state (``dtype``: the tensor's), and how many of them are paged."""
    if optimizer == "adamw":  # torch AdamW (fused): exp_avg and exp_avg_sq like the tensor, an fp32 step
        return 2 * numel * _SIZE[dtype] + 4, 0
    if optimizer in ("adamw8bit", "pagedAdamw8bit", "pagedAdamw32bit"):
        if optimizer == "pagedAdamw32bit" or numel < BNB_MIN_8BIT_SIZE:
            state = 2 * numel * 4
        else:
            state = 2 * numel + 2 * 4 * math.ceil(numel / BNB_OPTIMIZER_BLOCK)
        paged = optimizer.startswith("paged") and numel >= BNB_PAGED_MIN_SIZE
        return state, state if paged else 0
    if optimizer == "adafactor":
        # transformers' Adafactor (no first moment): the factored second moment of a matrix (its rows'
        # and columns' means), the full one of a vector, in fp32 (it upcasts 16-bit gradients), and the
        # parameter's RMS as a scalar tensor.
        if len(shape) >= 2:
            rows = math.prod(shape[:-1])
            cols = math.prod(shape[:-2]) * shape[-1]
            return (rows + cols) * 4 + 4, 0
        return numel * 4 + 4, 0
    if optimizer == "sgd":  # the Trainer's SGD has no momentum: no state
        return 0, 0
    raise EstimateError(f"spec.training.optimizer {optimizer!r} is not modeled")


def _no_decay(name: str) -> bool:
    """The Trainer's parameter groups: biases and norm weights are not weight-decayed."""
    return name.endswith(".bias") or "norm" in name


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of one rank of a training job, in bytes.

    ``total`` is not the sum of the lines: gradients and activations peak at different times (see the
    module docstring). ``host_bytes`` is what CPU offload keeps in the node's memory per rank.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    total: int
    #: Bytes allocated by tensors at the peak (``total`` without the CUDA context, NCCL and fragmentation).
    allocated: int
    host_bytes: int
    world_size: int
    parameters: int
    trainable_parameters: int
    #: Paged optimizer state (bitsandbytes), included in ``optimizer``: it can move to host memory.
    pageable: int
    #: DeepSpeed's working buffers, included in ``weights`` and ``gradients``: ZeRO-3's gathered
    #: parameters and prefetch bucket, the gradient reduce bucket.
    buffers: int
    activation_detail: Activations
    #: (label, bytes) lines that make up the components, for :meth:`explain`.
    lines: tuple[tuple[str, int], ...]
    notes: tuple[str, ...] = ()

    def fits(self, gpu_memory_bytes: int) -> bool:
        """Whether the peak fits in a GPU of ``gpu_memory_bytes``."""
        return self.total <= gpu_memory_bytes

    def to_dict(self) -> dict[str, int]:
        """The breakdown as integers (for status.preflight)."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "overhead": self.overhead,
            "total": self.total,
            "hostBytes": self.host_bytes,
            "worldSize": self.world_size,
            "parameters": self.parameters,
            "trainableParameters": self.trainable_parameters,
        }

    def explain(self, gpu_memory_bytes: int | None = None) -> str:
        """A readable breakdown, and the verdict against ``gpu_memory_bytes`` when given."""

        def gib(n: int) -> str:
            return f"{n / GIB:8.2f} GiB"

        a = self.activation_detail
        out = [
            f"Estimated GPU memory per rank ({self.world_size} rank{'s' if self.world_size != 1 else ''}): "
            f"{self.total / GIB:.2f} GiB",
            f"  parameters {self.parameters:,}, trained {self.trainable_parameters:,}",
            f"  weights      {gib(self.weights)}",
            f"  gradients    {gib(self.gradients)}",
            f"  optimizer    {gib(self.optimizer)}"
            + (f"  ({self.pageable / GIB:.2f} GiB paged)" if self.pageable else ""),
            f"  activations  {gib(self.activations)}  ({a.tokens:,} tokens a micro-batch"
            + (", gradient checkpointing" if a.gradient_checkpointing else "")
            + ")",
            f"  overhead     {gib(self.overhead)}  (CUDA context, NCCL, {FRAGMENTATION:.0%} allocator fragmentation)",
        ]
        out += [f"    {label}: {n / GIB:.3f} GiB" for label, n in self.lines]
        out.append(
            "  total = weights + optimizer + max(activations (+ gradients when accumulating), "
            "gradients + optimizer step) + overhead"
        )
        if self.host_bytes:
            out.append(f"  host memory (CPU offload): {self.host_bytes / GIB:.2f} GiB per rank")
        out += [f"  note: {n}" for n in self.notes]
        if gpu_memory_bytes is not None:
            verdict = "fits" if self.fits(gpu_memory_bytes) else "does NOT fit"
            out.append(
                f"  {verdict} in {gpu_memory_bytes / GIB:.2f} GiB "
                f"(headroom {(gpu_memory_bytes - self.total) / GIB:+.2f} GiB)"
            )
        return "\n".join(out)


def world_size_of(spec: FineTuneJobSpec) -> int:
    """Data-parallel ranks of the job: nodes x processes per node (``auto``: the GPUs per node)."""
    procs = spec.distributed.procs_per_node
    per_node = procs if isinstance(procs, int) else max(spec.resources.gpus_per_node, 1)
    return spec.distributed.nodes * per_node


def _kernel(spec: FineTuneJobSpec) -> AttentionKernel:
    a = spec.model.attention
    return "sdpa" if a == "auto" else a


def estimate(
    model_config: Mapping[str, Any],
    spec: FineTuneJobSpec,
    *,
    world_size: int | None = None,
    tokenizer_length: int | None = None,
    bf16_supported: bool = True,
    device: Literal["cuda", "cpu"] = "cuda",
    teacher_config: Mapping[str, Any] | None = None,
) -> MemoryEstimate:
    """The per-GPU memory of training ``spec`` on the model ``model_config`` (its config.json as a dict).

    ``world_size``: data-parallel ranks (default: the spec's nodes x processes per node).
    ``tokenizer_length``: ``len(tokenizer)`` after ``spec.model.addTokens`` (the trainer grows the
    embeddings to it when it exceeds the config's vocabulary); default: every added token is new.
    ``spec.model.mineTokens`` adds up to its ``maxTokens`` more, counted in full.
    ``bf16_supported``: whether the GPU has bf16 (precision ``auto`` trains in bf16 there, else fp32).
    ``device``: ``cpu`` for a job without GPUs (``gpusPerNode: 0``): precision ``auto`` is fp32, dropout
    keeps its mask in the input's dtype, and there is no CUDA context or NCCL.
    ``teacher_config``: a ``distill`` job's teacher (its config.json as a dict); default: counted at
    the base's size.
    Raises :class:`UnsupportedModel` for an architecture it does not model, :class:`EstimateError`
    when the spec cannot apply to the model.
    """
    arch = Architecture.from_config(model_config)
    world = world_size_of(spec) if world_size is None else world_size
    if world < 1:
        raise EstimateError(f"world_size must be at least 1, got {world}")
    # Mined tokens are known only once the data is read: counted at spec.model.mineTokens.maxTokens.
    mined = spec.model.mine_tokens.max_tokens if spec.model.mine_tokens is not None else 0
    vocab = (
        arch.vocab_size + len(spec.model.add_tokens) + mined
        if tokenizer_length is None
        else max(arch.vocab_size, tokenizer_length + mined)
    )
    added_rows = vocab - arch.vocab_size
    mixed = _mixed_precision(spec, bf16_supported and device == "cuda")
    ds = spec.distributed.deepspeed
    plan = _plan(arch, spec, vocab=vocab, added_rows=added_rows, mixed=mixed, deepspeed_cast=ds is not None)
    quant = spec.method.quantization or QuantizationParams()
    residual = next(t.dtype for t in plan.tensors if t.name.endswith("embed_tokens.weight"))
    num = _Numerics(
        autocast=mixed if ds is None else None,  # DeepSpeed runs the cast model without autocast
        residual=residual,
        compute=quant.compute_dtype,
        lora_dropout=plan.lora_dropout,
        attention_dropout=spec.training.dropout if spec.training.dropout is not None else arch.attention_dropout,
        cpu=device == "cpu",
    )
    # QLoRA's k-bit preparation makes the embeddings' output require a gradient under checkpointing.
    input_grad = spec.method.type == "qlora" and spec.training.gradient_checkpointing
    acts = _activations(arch, plan, spec, num, vocab=vocab, kernel=_kernel(spec), input_grad=input_grad)

    trained = [t for t in plan.tensors if t.trainable]
    n_trained = sum(t.numel for t in trained)
    optimizer = spec.training.optimizer
    lines: list[tuple[str, int]] = []
    notes = list(plan.notes)
    host = 0
    step_transient = 0
    buffers = 0

    def weight_lines(tensors: Iterable[Tensor], divide: int = 1) -> int:
        groups: dict[str, int] = {}
        for t in tensors:
            label = {"base": "base", "adapter": "adapter", "copy": "trained copy", "added": "added-token rows"}[t.role]
            key = f"{label} weights ({t.dtype}{', double-quantized' if t.double_quant else ''})"
            groups[key] = groups.get(key, 0) + math.ceil(t.nbytes / divide)
        lines.extend(groups.items())
        return sum(groups.values())

    stage = ds.zero_stage if ds is not None else None
    if ds is None or (stage == 0 and mixed is None):
        # The Trainer's own loop (DDP when world > 1): everything on every rank, states per tensor.
        weights = weight_lines(plan.tensors)
        gradients = sum(t.nbytes for t in trained)
        lines.append(("gradients", gradients))
        opt = paged = 0
        for t in trained:
            b, p = _state_bytes(t.numel, t.shape, t.dtype, optimizer)
            opt, paged = opt + b, paged + p
        if optimizer in ("adamw8bit", "pagedAdamw8bit") and any(t.numel >= BNB_MIN_8BIT_SIZE for t in trained):
            opt += 2 * 256 * 4  # the two 8-bit quantization maps, once per device
        lines.append((f"optimizer states ({optimizer})", opt))
        if world > 1:
            # DDP's gradient buckets: a second copy of every gradient (gradient_as_bucket_view off).
            lines.append(("DDP gradient buckets", gradients))
            weights += gradients
        if optimizer == "adafactor" and trained:
            largest = max(trained, key=lambda t: t.numel)
            step_transient = largest.numel * 4 * (4 if _SIZE[largest.dtype] == 2 else 2)
    else:
        assert stage is not None
        parts = world if stage >= 1 else 1
        lp = mixed or "fp32"
        # Parameters: all of them in the 16-bit dtype, partitioned at stage 3 (small ones stay whole).
        if stage == 3:
            persistent = [t for t in plan.tensors if t.numel < 10 * arch.hidden_size]
            partitioned = [t for t in plan.tensors if t.numel >= 10 * arch.hidden_size]
            block = sum(t.nbytes for t in plan.tensors if re.search(r"\.layers\.0\.", t.name))  # one block, gathered
            gathered = max(block, max(t.nbytes for t in partitioned)) + int(0.9 * arch.hidden_size**2) * _SIZE[lp]
            if ds.offload_params == "cpu":
                host += sum(math.ceil(t.nbytes / parts) for t in partitioned)
                weights = weight_lines(persistent)
            else:
                weights = weight_lines(persistent) + weight_lines(partitioned, parts)
            lines.append(
                ("ZeRO-3 gathered parameters (one block or the largest matrix, and the prefetch bucket)", gathered)
            )
            weights += gathered
            buffers += gathered
        else:
            weights = weight_lines(plan.tensors)
        # Gradients: the 16-bit gradient of every trained parameter, partitioned from stage 2.
        grads_full = sum(t.nbytes for t in trained)
        bucket = arch.hidden_size**2 * _SIZE[lp]  # reduce_bucket_size: hidden_size^2 elements
        offload = ds.offload_optimizer == "cpu"
        if stage >= 2:
            gradients = (0 if offload else math.ceil(grads_full / parts)) + bucket
            buffers += bucket
            if offload:
                host += math.ceil(n_trained / parts) * 4  # fp32 gradient partitions for the CPU Adam
        else:
            gradients = grads_full
        lines.append((f"gradients ({lp}{', partitioned' if stage >= 2 else ''})", gradients))
        # Optimizer: an fp32 master copy and the states, over flat fp32 partitions per parameter group.
        groups = [
            sum(t.numel for t in trained if _no_decay(t.name)),
            sum(t.numel for t in trained if not _no_decay(t.name)),
        ]
        opt = paged = 0
        master = 0
        for g in (g for g in groups if g):
            part = math.ceil(g / parts)
            b, p = _state_bytes(part, (part,), "fp32", "adamw" if offload else optimizer)
            opt, paged, master = opt + b, paged + p, master + 4 * part
        if offload:
            host += opt + master
            lines.append(("optimizer states and fp32 master copy: on the host (offloadOptimizer cpu)", 0))
            opt = paged = 0
        else:
            lines.append(("fp32 master copy of the trained parameters", master))
            lines.append((f"optimizer states ({optimizer}, fp32 partitions)", opt))
            opt += master
            if mixed is not None:
                step_transient = 4 * math.ceil(n_trained / parts)  # fp32 gradient partition at the step
        if stage == 0:
            notes.append("ZeRO stage 0: DeepSpeed's mixed-precision optimizer, nothing partitioned")
    dpo = spec.task.dpo
    if (
        spec.task.type == "dpo"
        and (spec.method.type == "full" or (dpo is not None and dpo.reference_model is not None))
        and not (dpo is not None and dpo.precompute_reference_log_probs)
    ):
        # DPO's reference model stays loaded beside the policy (finetune_trainer.recipes.dpo): a frozen
        # copy of the base for `full`, or spec.task.dpo.referenceModel (counted at the base's size);
        # partitioned like the policy under ZeRO-3. PEFT without one disables the adapter instead,
        # and precomputed log-probabilities keep no reference while training.
        reference = sum(t.nbytes for t in plan.tensors if t.role in ("base", "added"))
        reference = math.ceil(reference / world) if stage == 3 else reference
        lines.append(("DPO reference model (frozen)", reference))
        weights += reference
    rl = spec.task.rl if spec.task.type == "rl" else None
    if rl is not None:
        # Online RL (finetune_trainer.recipes.rl, .ppo): under `full` with klCoef > 0 trl's trainers and our
        # PPO keep a frozen copy of the base as the reference (PEFT disables the adapter instead); a reward
        # model stays loaded for scoring, counted at the base's size. Both are partitioned like the policy
        # under ZeRO-3 (which PPO refuses). PPO's value head is one hidden-size row: not counted.
        base_bytes = sum(t.nbytes for t in plan.tensors if t.role in ("base", "added"))
        base_bytes = math.ceil(base_bytes / world) if stage == 3 else base_bytes
        if spec.method.type == "full" and rl.kl_coef > 0:
            lines.append(("RL reference model (frozen)", base_bytes))
            weights += base_bytes
        if rl.reward_model is not None:
            lines.append(("RL reward model (frozen, counted at the base's size)", base_bytes))
            weights += base_bytes
    distill = spec.task.distill if spec.task.type == "distill" else None
    teacher_logits = 0
    if distill is not None:
        # Distillation (finetune_trainer.recipes.distill): the frozen teacher stays loaded beside the
        # student, replicated on every rank (partitioned like the student under ZeRO-3), 4-bit with
        # teacherQuantization; its logits of a micro-batch and their fp32 log-probabilities at the
        # temperature (kept for the KL's backward) live through the student's forward and backward.
        teacher_arch = Architecture.from_config(teacher_config) if teacher_config is not None else arch
        teacher = _teacher_bytes(teacher_arch, spec, vocab=vocab)
        teacher = math.ceil(teacher / world) if stage == 3 else teacher
        what = "counted at the base's size" if teacher_config is None else "its config"
        quantized = f", {distill.teacher_quantization}" if distill.teacher_quantization != "none" else ""
        lines.append((f"distillation teacher (frozen{quantized}, {what})", teacher))
        weights += teacher
        tokens = spec.training.per_device_batch_size * spec.data.max_seq_length
        logits_dtype = mixed or _weights_dtype(spec, teacher_arch)
        teacher_logits = tokens * vocab * (_SIZE[logits_dtype] + 4)
        lines.append(("distillation teacher logits and fp32 log-probabilities of a micro-batch", teacher_logits))
    forgetting = spec.training.forgetting
    if forgetting is not None and forgetting.ewc is not None:
        # EWC (finetune_trainer.ewc): the Fisher information and theta0 of every trained parameter, two
        # fp32 copies on every rank for the penalty of every step (DeepSpeed is refused with it).
        anchor = 2 * 4 * n_trained
        lines.append(("EWC Fisher information and theta0 (2 x fp32 of the trained parameters)", anchor))
        weights += anchor
    if plan.adalora_importance_numel:
        importance = 3 * 4 * plan.adalora_importance_numel
        lines.append(("AdaLoRA importance estimates (3 x fp32)", importance))
        opt += importance

    lines.append(("activations kept for the backward pass", acts.kept))
    lines.append(
        (
            "largest transient (the loss's gradient or a block's backward"
            + (", with the recomputed block)" if acts.gradient_checkpointing else ")"),
            acts.peak - acts.kept,
        )
    )
    accumulating = spec.training.gradient_accumulation_steps > 1
    backward_phase = acts.peak + teacher_logits + (gradients if accumulating else 0)
    step_phase = gradients + max(step_transient, acts.at_last_block)
    allocated = weights + opt + max(backward_phase, step_phase)
    overhead = math.ceil(FRAGMENTATION * allocated)
    if device == "cuda":
        overhead += CUDA_CONTEXT_BYTES + (NCCL_BYTES if world > 1 else 0)
    if paged:
        notes.append(f"{paged / GIB:.2f} GiB of paged optimizer state may move to host memory under pressure")
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=opt,
        activations=acts.peak,
        overhead=overhead,
        total=allocated + overhead,
        allocated=allocated,
        host_bytes=host,
        world_size=world,
        parameters=sum(t.numel for t in plan.tensors if t.role in ("base", "adapter", "added")),
        trainable_parameters=n_trained,
        pageable=paged,
        buffers=buffers,
        activation_detail=acts,
        lines=tuple(lines),
        notes=tuple(notes),
    )


def gpu_memory_from_node_label(value: str) -> int:
    """Bytes of GPU memory from NVIDIA GPU feature discovery's ``nvidia.com/gpu.memory`` node label
    (MiB, e.g. ``81559``)."""
    return int(value) * MIB


def fits_total(total_bytes: int, spec: FineTuneJobSpec) -> bool | None:
    """Whether a per-rank peak of ``total_bytes`` (:attr:`MemoryEstimate.total`, or the ``total`` of
    ``status.preflight.memory``) fits the GPU memory of the spec (``spec.resources.gpuMemory``, or an
    ``nvidia.com/gpu.memory`` node selector: ``ResourcesSpec.gpu_memory_bytes``); None when neither says.
    The one comparison the operator, ``finetune plan`` and ``finetune run`` make."""
    declared = spec.resources.gpu_memory_bytes
    return None if declared is None else total_bytes <= declared


#: The lines of a per-rank breakdown (:class:`~.v1alpha1.PreflightMemory`), in the order printed.
BREAKDOWN_PARTS = ("weights", "gradients", "optimizer", "activations", "overhead", "total")


def memory_breakdown(memory: PreflightMemory, spec: FineTuneJobSpec) -> str:
    """The per-rank estimate of ``status.preflight.memory`` as text (GiB), with the verdict against the
    GPU memory of the spec (:func:`fits_total`): what ``finetune plan`` prints, and why a job is refused."""
    n = memory.world_size
    ranks = f" ({n} rank{'s' if n != 1 else ''})" if n else ""
    what = "GPU memory per rank" if spec.resources.gpus_per_node else "Memory per rank, CPU training"
    lines = [f"{what}{ranks}, estimated:"]
    lines += [f"  {part:<12} {getattr(memory, part) / GIB:8.2f} GiB" for part in BREAKDOWN_PARTS]
    lines.append("  (total is the peak: gradients and activations peak at different times, so it is not the sum)")
    declared = spec.resources.gpu_memory_bytes
    fits = fits_total(memory.total, spec)
    if declared is None:
        lines.append(
            "  fit not checked: no GPU memory declared (spec.resources.gpuMemory, or an nvidia.com/gpu.memory "
            "node selector)"
        )
    elif fits:
        lines.append(f"  fits in {declared / GIB:.2f} GiB (headroom {(declared - memory.total) / GIB:.2f} GiB)")
    else:
        lines.append(f"  does NOT fit in {declared / GIB:.2f} GiB ({(memory.total - declared) / GIB:.2f} GiB over)")
    return "\n".join(lines)


def fits_spec(estimate_: MemoryEstimate, spec: FineTuneJobSpec) -> bool | None:
    """Whether the estimate fits the GPU memory ``spec.resources.gpuMemory`` declares; None when the
    spec does not declare it (the preflight then reads the node label)."""
    return fits_total(estimate_.total, spec)
