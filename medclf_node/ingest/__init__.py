"""ingest layer of medclf-node."""
