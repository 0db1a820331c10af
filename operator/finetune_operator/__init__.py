"""finetune-operator: a Kubernetes-native operator for distributed LLM fine-tuning."""

__version__ = "0.1.0"
