"""`python -m fedgrpc.engines`: the launcher (a leader and its learners from one command)."""

import sys

from fedgrpc.engines.launcher import main

sys.exit(main())
