"""``python -m fl_sidecar`` is the ``fl-sidecar`` command."""

import sys

from fl_sidecar.cli import main

sys.exit(main())
