"""``python -m hlip_fast.train`` = ``hlip-train``."""

import sys

from .trainer import main

sys.exit(main())
