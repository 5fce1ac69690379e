"""``python -m hlip_fast.train`` = ``hlip-train``."""

import sys

from .cli import main

sys.exit(main())
