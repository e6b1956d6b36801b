"""Your own model and text: a local Hugging Face causal-LM folder (--model) and a text or JSONL
file (--data), read, tokenised with the model's tokenizer, packed into sequences and split.

Every problem with the inputs raises DemoInputError (a ValueError) naming the path or value;
main() turns it into a usage error (exit code 2) before any training starts."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._batches import TokenBatches

# Files one of which a Hugging Face tokenizer folder has (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack")
# Plain-text files are tokenised this many lines at a time (bounded memory; cuts at line ends).
LINES_PER_CHUNK = 2000


class DemoInputError(ValueError):
    """A --model folder or --data file the demo cannot use; the message names it and says why."""


def check_model_dir(path: Path) -> Path:
    """The folder, resolved, if it looks like a Hugging Face causal-LM folder with a tokenizer."""
    if not path.exists():
        raise DemoInputError(f"--model {path}: no such folder")
    if not path.is_dir():
        raise DemoInputError(f"--model {path} is a file; expected a Hugging Face model folder "
                             "(config.json, weights, tokenizer files), as save_pretrained writes it")
    if not (path / "config.json").is_file():
        raise DemoInputError(f"--model {path} has no config.json, so it is not a Hugging Face model folder "
                             "(save_pretrained writes config.json, the weights and, for a tokenizer, its files)")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise DemoInputError(f"--model {path} has a config.json but no weight files ({', '.join(WEIGHT_PATTERNS)})")
    if (path / "adapter_config.json").is_file():
        raise DemoInputError(f"--model {path} holds an adapter (adapter_config.json): from_pretrained would load the "
                             "base with that adapter applied; pass the base model's own folder")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DemoInputError(f"--model {path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there. "
                             "Save the tokenizer into the same folder (tokenizer.save_pretrained(folder))")
    return path.resolve()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError, ... by case
        raise DemoInputError(f"--model {path}: AutoTokenizer.from_pretrained could not load its tokenizer "
                             f"({type(exc).__name__}: {exc})") from exc


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained(path), local files only, in dtype, fully frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the demo's output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise DemoInputError(f"--model {path}: AutoModelForCausalLM.from_pretrained could not load it "
                             f"({type(exc).__name__}: {exc})") from exc
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    # from_pretrained applied dtype to the weights and kept float32 buffers (rotary frequencies)
    # float32, as a user's later from_pretrained will: only the device changes here.
    return model.to(device=device)


def check_causal(model: nn.Module, path: Path, device: torch.device) -> None:
    """DemoInputError unless the model is causal: its logits at a position must not depend on
    later tokens (a BERT loaded as a causal LM sees them, and its next-token loss is meaningless)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(1, 6, device=device).remainder(vocab).unsqueeze(0)
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % vocab
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[0, :-1].float(), model(input_ids=other).logits[0, :-1].float()
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-6):
        raise DemoInputError(f"--model {path} is not a causal language model: its predictions at a position change "
                             f"with later tokens (by {float((a - b).abs().max()):.2e}), so its next-token loss would "
                             "be meaningless (e.g. BERT loaded as a decoder)")


def read_documents(path: Path) -> List[str]:
    """The texts of --data: one per non-blank line of a .jsonl file (its "text" field), else the
    whole file as one text (in chunks of LINES_PER_CHUNK lines, cut at line ends)."""
    if not path.exists():
        raise DemoInputError(f"--data {path}: no such file")
    if not path.is_file():
        raise DemoInputError(f"--data {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DemoInputError(f"--data {path} is not UTF-8 text ({exc})") from None
    if not text.strip():
        raise DemoInputError(f"--data {path} is empty (no text to train on)")
    if path.suffix.lower() != ".jsonl":
        lines = text.splitlines(keepends=True)
        return ["".join(lines[i:i + LINES_PER_CHUNK]) for i in range(0, len(lines), LINES_PER_CHUNK)]
    documents = []
    # JSON Lines are separated by "\n" only: str.splitlines would also split inside a string at
    # U+2028 or U+0085, which JSON writes raw.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DemoInputError(f"--data {path}, line {number}: not JSON ({exc.msg}); a .jsonl file needs one "
                                 "{\"text\": ...} object per line") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DemoInputError(f"--data {path}, line {number}: no \"text\" field (got {line.strip()[:80]!r}); "
                                 "a .jsonl file needs one {\"text\": ...} object per line")
        if not isinstance(record["text"], str):
            raise DemoInputError(f"--data {path}, line {number}: \"text\" must be a string, got "
                                 f"{type(record['text']).__name__}")
        if record["text"].strip():
            documents.append(record["text"])
    if not documents:
        raise DemoInputError(f"--data {path}: every \"text\" is empty (no text to train on)")
    return documents


def tokenize(documents: List[str], tokenizer, path: Path, jsonl: bool) -> torch.Tensor:
    """One stream of token ids: the documents' tokens (no special tokens added), each JSONL record
    followed by the tokenizer's EOS token when it has one (chunks of one text file are not)."""
    ids: List[int] = []
    eos: Optional[int] = tokenizer.eos_token_id
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    for tokens in encoded:
        ids.extend(tokens)
        if jsonl and eos is not None:
            ids.append(eos)
    if not ids:
        raise DemoInputError(f"--data {path}: the tokenizer made no tokens of it")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TextData:
    train: torch.Tensor  # (n_train, seq_len) token ids
    heldout: torch.Tensor  # (n_heldout, seq_len): the last sequences of the file
    tokens: int  # tokens the file gave
    dropped: int  # tail tokens that did not fill a sequence


def pack_and_split(ids: torch.Tensor, seq_len: int, heldout_fraction: float, path: Path) -> TextData:
    """Cuts the token stream into consecutive sequences of seq_len tokens (the last, incomplete
    one dropped) and holds out the last max(1, floor(n * heldout_fraction)) of them, so that
    held-out text follows the training text and never overlaps it. Needs n >= 2."""
    count = ids.numel() // seq_len
    if count < 2:
        raise DemoInputError(f"--data {path} is too short: {ids.numel()} tokens with this tokenizer, but --seq-len "
                             f"{seq_len} needs at least {2 * seq_len} (one training and one held-out sequence)")
    sequences = ids[:count * seq_len].view(count, seq_len)
    heldout = max(1, int(count * heldout_fraction))
    return TextData(train=sequences[:count - heldout], heldout=sequences[count - heldout:], tokens=ids.numel(),
                    dropped=ids.numel() - count * seq_len)


def load_text_data(path: Path, tokenizer, seq_len: int, heldout_fraction: float) -> TextData:
    documents = read_documents(path)
    ids = tokenize(documents, tokenizer, path, jsonl=path.suffix.lower() == ".jsonl")
    return pack_and_split(ids, seq_len, heldout_fraction, path)


def check_fits(model: nn.Module, data: TextData, model_dir: Path, seq_len: int) -> None:
    """The tokenizer's ids must index the model's embedding; seq_len must fit its positions."""
    vocab = model.get_input_embeddings().num_embeddings
    largest = int(max(data.train.max(), data.heldout.max()))
    if largest >= vocab:
        raise DemoInputError(f"--model {model_dir}: its tokenizer made token id {largest}, but the model's embedding "
                             f"has only {vocab} rows; the tokenizer does not belong to this model")
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and seq_len > positions:
        raise DemoInputError(f"--seq-len {seq_len} is longer than --model {model_dir} supports "
                             f"(max_position_embeddings {positions})")


def training_batches(train: torch.Tensor, steps: int, batch_size: int, seed: int) -> TokenBatches:
    """`steps` batches of (batch, seq_len) token ids: the training sequences in a seeded random
    order, reshuffled at each pass over them (an epoch), so every sequence is seen before any is
    seen again; each batch is gathered when it is asked for (TokenBatches)."""
    gen = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order: List[torch.Tensor] = []
    have = 0
    while have < needed:
        order.append(torch.randperm(train.shape[0], generator=gen))
        have += train.shape[0]
    index = torch.cat(order)[:needed].view(steps, batch_size)
    return TokenBatches(steps, lambda i: train[index[i]])


def describe_model(model: nn.Module, path: Path) -> Tuple[str, str]:
    """(short description for the table, model class name)."""
    config = model.config
    parts = [type(model).__name__, f"from {path.name}"]
    for key, label in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("vocab_size", "vocab")):
        value = getattr(config, key, None)
        if value is not None:
            parts.append(f"{label} {value}")
    return " ".join(parts[:2]) + (" (" + ", ".join(parts[2:]) + ")" if parts[2:] else ""), type(model).__name__
