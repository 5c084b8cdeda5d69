"""net layer of medclf-node."""
