"""`python -m fedgrpc.learner`: the learner's command."""

from fedgrpc.learner.main import run

run()
