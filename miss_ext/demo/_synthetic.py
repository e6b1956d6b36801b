"""The default task: a random-init Llama built from a config and a synthetic counting task."""
import math

import torch
from torch import nn

from ._batches import TokenBatches
from ._cli import ModelDims

# The task's alphabet: tokens are residues modulo VOCAB, so the vocabulary is exactly that size.
VOCAB = 64
# Steps of the counting sequences are drawn from 1..MAX_STRIDE; the model must infer each
# sequence's step from its first two tokens (attention), then continue the count (MLP).
MAX_STRIDE = 7
# Distinct sequences of the task: a (start, stride) pair each.
TASK_SEQUENCES = VOCAB * MAX_STRIDE


def build_base_model(dims: ModelDims, seq_len: int, seed: int, dtype: torch.dtype = torch.float32,
                     device="cpu") -> nn.Module:
    """A random-init LlamaForCausalLM, identical for identical arguments, fully frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
        max_position_embeddings=seq_len, tie_word_embeddings=False,
        # Fan-in scaled init instead of HF's 0.02: the output head is frozen and sits behind an
        # RMSNorm, so its row norms cap the logits; with std 0.02 they stay below ~1 and no
        # adapter could make a confident prediction.
        initializer_range=dims.hidden ** -0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    # The weights in dtype, the buffers (rotary frequencies) kept float32, as
    # from_pretrained(dtype=...) loads the saved base later: the reloaded model is this one.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
    return model.to(device=device)


def make_batches(count: int, batch_size: int, seq_len: int, seed: int,
                 exclude: torch.Tensor = None) -> TokenBatches:
    """`count` batches of (batch, seq) token ids: x[t] = (start + stride * t) mod VOCAB per
    sequence, with a random start and a random stride in 1..MAX_STRIDE. Drawn on the CPU from its
    own generator, so every variant and device sees the same tokens; each batch's tokens are made
    when it is asked for (TokenBatches). Sequences of `exclude` (token ids, (n, seq)) are drawn
    again: the task has only VOCAB * MAX_STRIDE sequences, so a held-out batch must be kept out of
    the training batches explicitly."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, batch_size, 1), generator=gen)
    stride = torch.randint(1, MAX_STRIDE + 1, (count, batch_size, 1), generator=gen)
    if exclude is not None:
        # A sequence is its (start, stride) pair, coded as one integer.
        banned = exclude[:, 0] * (MAX_STRIDE + 1) + (exclude[:, 1] - exclude[:, 0]) % VOCAB
        while (hit := torch.isin(start * (MAX_STRIDE + 1) + stride, banned)).any():
            start[hit] = torch.randint(0, VOCAB, (int(hit.sum()),), generator=gen)
            stride[hit] = torch.randint(1, MAX_STRIDE + 1, (int(hit.sum()),), generator=gen)
    steps = torch.arange(seq_len)
    return TokenBatches(count, lambda i: (start[i] + stride[i] * steps) % VOCAB)


def loss_floor(seq_len: int) -> float:
    """The lowest mean loss possible on make_batches data: the second token is one of MAX_STRIDE
    equally likely values, every later one is determined (the first is never predicted)."""
    return math.log(MAX_STRIDE) / (seq_len - 1)
