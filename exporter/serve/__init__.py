"""What the exporter serves: the HTTP listener, its web config, and the rendered /metrics."""
