"""``python -m fedevents.cli`` is the ``fedevents`` command."""

import sys

from .main import main

sys.exit(main())
