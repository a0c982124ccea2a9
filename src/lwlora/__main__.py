"""``python -m lwlora``: the same command line as ``lwlora``."""

import sys

from lwlora.cli import main

sys.exit(main())
