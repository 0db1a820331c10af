"""QLoRA: LoRA on a base model quantized to 4 bits by bitsandbytes.

Supports the nf4 and fp4 data types, double quantization of the quantization constants, the compute
dtype of the dequantized matmuls, k-bit training preparation (norms in fp32, input gradients enabled),
and the paged 8-bit AdamW optimizer on CUDA (``training.optimizer: pagedAdamw8bit``). Gradient
checkpointing is non-reentrant, which DDP needs. Cannot be combined with ZeRO-3 (refused by the spec).
A merged output dequantizes the 4-bit base first, so the merged model computes what the adapter was
trained against.
"""

from __future__ import annotations

from typing import Any

import torch
from finetune_operator.api.v1alpha1 import LoRAParams, QuantizationParams
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from . import added_tokens
from .context import MethodContext, base_model
from .lora import lora_config, untargeted

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quantization(ctx: MethodContext) -> QuantizationParams:
    return ctx.spec.method.quantization or QuantizationParams()


def load_kwargs(ctx: MethodContext) -> dict[str, Any]:
    q = quantization(ctx)
    return {
        # transformers leaves BitsAndBytesConfig.__init__ unannotated.
        "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[q.compute_dtype],
        )
    }


def apply(model: PreTrainedModel, ctx: MethodContext) -> PeftModel:
    # peft leaves prepare_model_for_kbit_training unannotated; it returns the model it was given.
    model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model,
        use_gradient_checkpointing=ctx.spec.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    config = lora_config(ctx.spec.method.lora or LoRAParams(), ctx.peft_task_type, untargeted(ctx))
    peft_model = get_peft_model(model, config)
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model
