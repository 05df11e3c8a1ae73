"""``python -m nextscale`` is the ``nextscale`` command."""

import sys

from nextscale.cli.main import main

sys.exit(main())
