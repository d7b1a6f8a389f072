from __future__ import annotations

import sys

from dtlray.cli import main

sys.exit(main())
