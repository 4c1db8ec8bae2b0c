"""llmtune: LoRA/QLoRA fine-tuning from a YAML recipe, stage by stage."""

import logging

__version__ = "0.1.0"

# bitsandbytes, imported on a CPU with AVX512-BF16, warns that the optional `kernels` package is
# missing ("Failed to load CPU gemm_4bit_forward from kernels-community"): nothing a user of
# llmtune can or needs to act on, and it landed in the middle of `chat`. Set before any import.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# With `kernels` installed, that same import asks the Hub for the kernel, and offline (as every
# llmtune command runs unless told to fetch) kernels logs "Skipping publisher trust check for
# 'kernels-community/…' because Hugging Face Hub is in offline mode" on every command, into the
# output of chat and generate. Its real errors still show.
logging.getLogger("kernels").setLevel(logging.ERROR)
