"""One command for a whole federation: `python local_federation.py --learners 2` starts the leader and its learners.

The launcher lives in fedgrpc/engines/launcher.py; installed, the same command is `fedgrpc-launch`.
"""

import sys

from fedgrpc.engines.launcher import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
