"""The first event source: scheduled DescribeTasks listings, look-ups, and the pure diff."""
