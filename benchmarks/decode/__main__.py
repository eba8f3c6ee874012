"""`python -m benchmarks.decode`: runs benchmarks/decode/run.py."""

import sys

from benchmarks.decode.run import main

sys.exit(main())
