"""`python -m benchmarks.quality`: runs benchmarks/quality/run.py."""

import sys

from benchmarks.quality.run import main

sys.exit(main())
