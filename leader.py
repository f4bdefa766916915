"""The leader's door, as in the blog: `python leader.py --learners 2` runs the leader (fedgrpc/leader/ holds it).

    python leader.py --learners 2 --task my_task.py

Installed, the same command is `fedgrpc-leader` (or `python -m fedgrpc.leader`).
"""

import sys

from fedgrpc.leader.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
