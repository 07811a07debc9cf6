"""`python -m attribution.findings`: the findings CLI (attribution.findings.cli)."""

import sys

from attribution.findings.cli import main

sys.exit(main())
