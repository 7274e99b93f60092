"""``python -m selgroup_fast.bench``: the same as the ``selgroup-bench`` command."""

import sys

from . import main

sys.exit(main())
