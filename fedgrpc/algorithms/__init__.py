"""The algorithms, free of gRPC: aggregation rules, the round's strategy, server optimizers, FedBuff's staleness,
differential privacy, secure aggregation's arithmetic and the learning-rate schedule."""
