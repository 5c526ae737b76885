"""What the exporter knows: per-app state, its one writer (`AppState.apply`), its SQLite store."""
