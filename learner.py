"""The learner's door, as in the blog: `python learner.py --leader host:port` runs a learner (fedgrpc/learner/ holds it).

Installed, the same command is `fedgrpc-learner` (or `python -m fedgrpc.learner`).
"""

from fedgrpc.learner.main import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
