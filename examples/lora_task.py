"""A LoRA task: a Hugging Face causal LM fine-tuned through PEFT adapters, so that only the adapters travel.

The base model is a local directory that every machine holds alike (`FEDGRPC_BASE_MODEL`): the leader and each learner
load the same frozen weights from it, and only the LoRA matrices train, are sent and are averaged. Make a tiny
Llama-style base to try it (no download), then run a federation:

    python -m examples.lora_task base-model
    FEDGRPC_BASE_MODEL=base-model python local_federation.py --task examples/lora_task.py --aggregation fedavg --local-steps 20 --rounds 5 --lr 0.2

The data are token sequences that count up from a seeded random token, x[t+1] = (x[t] + 1) mod VOCAB: every token
after the first follows from the one before it. Inputs are a sequence's first LENGTH tokens, targets the same shifted by
one; the default loss (cross-entropy over the last dimension) scores each position. `FEDGRPC_LORA_FULL=1` trains the
whole base model instead, without adapters (bench/lora.py's comparison, with --share all).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

BASE_MODEL_ENV = "FEDGRPC_BASE_MODEL"  # the local directory of the base model (save_pretrained's layout)
FULL_ENV = "FEDGRPC_LORA_FULL"  # "1": no adapters, every base weight trains and travels
LORA_RANK = 4
LORA_ALPHA = 8  # the adapters' output is scaled by alpha / rank
TARGET_MODULES = ["q_proj", "v_proj"]  # the original LoRA paper's choice: the attention's query and value projections
VOCAB = 32  # tokens the data use (a base's vocabulary may be larger)
LENGTH = 16  # tokens of input per sequence
# make_tiny_base's random weights stand in for pretrained ones: at Llama's 0.02 its outputs hardly depend on the input,
# leaving the adapters next to nothing to steer; wider, its frozen features vary with the tokens
BASE_INIT_STD = 0.2

# peft 0.21 asks transformers 5 a question under its deprecated name; nothing a user of this task can change
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
transformers_logging.disable_progress_bar()  # a bar per save and load would cut into the leader's and learners' log lines


class CausalLM(nn.Module):
    """A causal LM called as the learners call a task's model: model(token_ids) -> logits [batch, positions, vocabulary]."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=token_ids, use_cache=False).logits


def make_tiny_base(directory: str | Path, hidden: int = 32, layers: int = 2, vocab: int = VOCAB, seed: int = 0) -> Path:
    """Write a small randomly initialized Llama-style causal LM to `directory` (save_pretrained), as a stand-in base model."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as Llama 2 and 3: v_proj is narrower than q_proj
        max_position_embeddings=4 * LENGTH,
        tie_word_embeddings=False,
        initializer_range=BASE_INIT_STD,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return Path(directory)


def base_model_dir() -> Path:
    """The base model's directory, from FEDGRPC_BASE_MODEL; an error saying what to do when it is unset or missing."""
    value = os.environ.get(BASE_MODEL_ENV)
    if not value:
        raise RuntimeError(
            f"{BASE_MODEL_ENV} is not set: point it at a local base model directory (make one: python -m examples.lora_task DIR)"
        )
    path = Path(value)
    if not (path / "config.json").is_file():
        raise RuntimeError(
            f"{BASE_MODEL_ENV}={value}: no base model there (config.json missing); make one: python -m examples.lora_task {value}"
        )
    return path


def model() -> nn.Module:
    lm = AutoModelForCausalLM.from_pretrained(base_model_dir(), local_files_only=True, dtype=torch.float32)
    if os.environ.get(FULL_ENV) == "1":
        return CausalLM(lm)
    return CausalLM(get_peft_model(lm, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES)))


def shared(model: nn.Module) -> str:
    return "adapters"  # get_peft_model froze the base: only the LoRA matrices require grad (with FEDGRPC_LORA_FULL, everything)


def _sequences(count: int, seed: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty((count, LENGTH + 1), dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, VOCAB, (count,), generator=generator)
    for position in range(1, LENGTH + 1):
        tokens[:, position] = (tokens[:, position - 1] + 1) % VOCAB
    return torch.utils.data.TensorDataset(tokens[:, :-1].clone(), tokens[:, 1:].clone())


def train_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _sequences(512, seed=1)


def test_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _sequences(256, seed=2)


# loss and metrics: the defaults, cross-entropy and accuracy of the next token at every position


def main() -> None:
    """Write a tiny base model to a directory: python -m examples.lora_task DIR."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", help="where to write the base model (save_pretrained's files)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size (default: 32)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size, at least {VOCAB} (default: {VOCAB})")
    args = parser.parse_args()
    if args.vocab < VOCAB:
        parser.error(f"--vocab must be at least {VOCAB}: the data use {VOCAB} tokens")
    path = make_tiny_base(args.directory, args.hidden, args.layers, args.vocab)
    print(f"a tiny base model is in {path}; run with {BASE_MODEL_ENV}={path}")


if __name__ == "__main__":
    main()
