"""A PyTorch training script: the tabular MLP on one site's CSV files, with its own optimizer (federated_training.py is
plain_training.py joined to a federation: `diff` the two)."""

from __future__ import annotations

import argparse

import torch

import fedgrpc
from examples import tabular


def evaluate(model: torch.nn.Module, test_set: torch.utils.data.TensorDataset) -> dict[str, float]:
    with torch.no_grad():
        features, target = test_set.tensors
        return tabular.metrics(model(features), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", required=True, help="a site directory holding train.csv and test.csv")
    parser.add_argument("--leader", required=True, help="the leader's host:port")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = tabular.model()
    train_set, test_set = tabular.train_data(args.site), tabular.test_data(args.site)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    federation = fedgrpc.join(model, "tabular", args.leader, num_examples=len(train_set), test_data=test_set, loss=tabular.loss)
    for epoch in federation.rounds():
        for features, target in loader:
            optimizer.zero_grad()
            loss = tabular.loss(model(features), target)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: test {evaluate(model, test_set)}")
        federation.send(loss=loss.item())


if __name__ == "__main__":
    main()
