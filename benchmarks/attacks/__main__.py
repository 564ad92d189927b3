"""``python -m benchmarks.attacks``: see :mod:`benchmarks.attacks.run`."""

import sys

from benchmarks.attacks.run import main

sys.exit(main())
