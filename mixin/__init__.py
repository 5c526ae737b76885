"""The monitoring mixin: alerting and recording rules and the Grafana dashboard, generated
from one configuration (mixin/config.yml) by `python -m mixin`."""
