"""The learner's side: its process and round loop (`main`), gRPC service, data and model checks, local training,
its part in secure aggregation, and its command line. `python -m fedgrpc.learner` runs it."""
