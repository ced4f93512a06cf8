"""Hugging Face MoE models: the families we support, reading their safetensors, `import-hf`, and
the whole-model runner (transformers' dense model with its MoE blocks computed elsewhere). No Ray;
transformers only when a model runs."""
