"""`python -m mixin`: regenerate the rules, the PrometheusRule and the dashboard."""

import sys

from mixin.generate import main

sys.exit(main(sys.argv[1:]))
