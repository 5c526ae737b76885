"""`python -m exporter.simulator`: the same as `zego-cloudrecord-simulator`."""

import sys

from exporter.simulator.cli import main

sys.exit(main())
