"""``python -m cpmproxy.client`` is ``cpm-sync``."""

import sys

from cpmproxy.client.cli import main

sys.exit(main())
