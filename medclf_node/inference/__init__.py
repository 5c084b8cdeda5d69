"""inference layer of medclf-node."""
