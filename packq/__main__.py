"""``python -m packq``: the command line."""

import sys

from packq.cli import main

sys.exit(main())
