"""`python -m fedgrpc.leader`: the leader's command."""

import sys

from fedgrpc.leader.main import main

sys.exit(main())
