"""`python -m benchmarks.synthetic`: runs benchmarks/synthetic/run.py."""

import sys

from benchmarks.synthetic.run import main

sys.exit(main())
