"""The leader's side: its process (`main`), gRPC service, coordinator, roster of learners, each round's intake,
secure rounds, federated evaluation, checkpoints and run records. `python -m fedgrpc.leader` runs it."""
