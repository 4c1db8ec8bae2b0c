"""llmtune: LoRA/QLoRA fine-tuning from a YAML recipe, stage by stage."""

__version__ = "0.1.0"
