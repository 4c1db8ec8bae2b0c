"""The training loss without the full tokens x vocabulary logits.

A causal LM computes logits for every position (SmolLM2: 8 x 512 tokens x 49,152 vocabulary is
805 MB in fp32, and backward keeps more of the same) although only trained positions count.
summed_token_loss takes the final hidden states, keeps the trained positions, and computes the
cross-entropy `chunk_rows` tokens at a time (in training under activation checkpointing:
trainer.ChunkedLossTrainer), so at most one chunk of logits exists at once; the value and
gradients equal the model's own loss (tested). Evaluation (serve/inference.py) uses it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint

from llmtune.data.chat import IGNORE

# A chunk's logits hold at most this many values (32 MB in fp32): 170 positions of SmolLM2's 49k
# vocabulary, 65 of Llama 3's 128k. With 1024 positions a chunk's logits, their fp32 copy, log-
# softmax and gradients made SmolLM2's training peak 3.5 GB of RSS instead of 2.5-3.0 at the same
# speed (scripts/bench_train.py, docs/benchmarks.md).
LOGITS_PER_CHUNK = 2**23
MAX_CHUNK = 1024  # positions: more gains nothing once the head's matmul is large


def chunk_rows(vocab_size: int) -> int:
    """Positions whose logits are computed at once."""
    return min(MAX_CHUNK, max(16, LOGITS_PER_CHUNK // vocab_size))


# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping or scaling
# (a vision-language model's by its language model: LLaVA's and Idefics3's are llamas).
PLAIN_HEAD_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "qwen2_vl_text", "qwen2_5_vl_text",
                    "mllama_text_model"}
# ... and those whose logits are then soft-capped: cap * tanh(logits / cap) (Gemma 2 and 3).
SOFTCAPPED_HEAD_TYPES = {"gemma2", "gemma3_text"}


def chunked_loss_supported(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None) in PLAIN_HEAD_TYPES | SOFTCAPPED_HEAD_TYPES


def final_hidden_states(model, forward: dict):
    """(the decoder's final hidden states, the model's outputs), with the output head run on no
    position at all. The hidden states come from a hook on the decoder, not from
    output_hidden_states=True, which keeps every layer's output for the whole batch (an 8B Llama
    at 8 x 2048 tokens: 4.4 GB in evaluation, where nothing else keeps them). The hook sits on
    the inner module, so DDP's and FSDP's forward still runs as the wrapper's."""
    # An empty index: the model's own head runs on no position at all. (logits_to_keep=1 hands
    # it a non-contiguous [batch, 1, hidden] slice, which CPU matmul can serve by expanding the
    # head's weight per row: 2.1 GB for a batch of 4 with a 128k vocabulary, measured.)
    device = next(iter(forward.values())).device
    nothing = torch.empty(0, dtype=torch.long, device=device)
    decoder = extract_model_from_parallel(model).get_decoder()
    kept = []
    handle = decoder.register_forward_hook(lambda module, args, output: kept.append(output[0]))
    try:
        outputs = model(**forward, logits_to_keep=nothing)
    finally:
        handle.remove()
    return kept[-1], outputs


def summed_token_loss(model, inputs: dict, checkpointed: bool = False) -> tuple[torch.Tensor, int, object]:
    """(summed cross-entropy over the trained positions, their count, the model's outputs),
    computed from the final hidden states `chunk_rows` positions at a time: no full logits. With
    `checkpointed`, each chunk's logits are recomputed in backward instead of kept."""
    labels = inputs["labels"]
    forward = {key: value for key, value in inputs.items() if key != "labels"}
    hidden, outputs = final_hidden_states(model, forward)
    hidden = hidden[:, :-1]
    targets = labels[:, 1:]
    trained = targets != IGNORE
    hidden, targets = hidden[trained], targets[trained]
    unwrapped = extract_model_from_parallel(model)  # DDP wraps the model
    head = unwrapped.get_output_embeddings()
    text = unwrapped.config.get_text_config()  # a vision-language model's language model
    softcap = getattr(text, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    rows = chunk_rows(text.vocab_size)
    for start in range(0, targets.numel(), rows):
        chunk = (head, hidden[start:start + rows], targets[start:start + rows], softcap)
        total = total + (checkpoint(_chunk_loss, *chunk, use_reentrant=False) if checkpointed
                         else _chunk_loss(*chunk))
    return total, targets.numel(), outputs


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    # accelerate hands mixed-precision outputs back in fp32; outside autocast (evaluation) the
    # hidden states must meet the head's own dtype (bf16 frozen weights)
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(weight.dtype)
    logits = head(hidden)
    if softcap is not None:  # as Gemma's forward does, in the logits' own dtype
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")
