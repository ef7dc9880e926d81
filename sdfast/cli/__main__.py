"""``python -m sdfast.cli``: the ``sdfast`` command."""

import sys

from . import main

sys.exit(main())
