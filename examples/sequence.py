"""A sequence task: a GRU language model learns next-token prediction on int64 token sequences the task makes.

Each sequence follows x[t+1] = (x[t] + x[t-1]) mod VOCAB from two random tokens, so every token after the second
is predictable from what came before; the inputs are the first LENGTH tokens and the targets the same shifted by
one. The data set is made here from a fixed seed (no download): the leader splits it among the learners.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 16
LENGTH = 12


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.gru = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(self.embed(tokens))
        return self.head(hidden)  # [batch, LENGTH, VOCAB]: a score per next token at every position


def model() -> nn.Module:
    return TinyGRU()


def _sequences(count: int, seed: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty((count, LENGTH + 1), dtype=torch.int64)
    tokens[:, :2] = torch.randint(0, VOCAB, (count, 2), generator=generator)
    for position in range(2, LENGTH + 1):
        tokens[:, position] = (tokens[:, position - 1] + tokens[:, position - 2]) % VOCAB
    return torch.utils.data.TensorDataset(tokens[:, :-1].clone(), tokens[:, 1:].clone())


def train_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _sequences(4000, seed=1)


def test_data(data_dir: str | None) -> torch.utils.data.Dataset:
    return _sequences(1000, seed=2)


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, VOCAB), targets.reshape(-1))


# metrics: the default, accuracy of the most likely next token over every position
