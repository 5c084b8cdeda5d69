"""reporting layer of medclf-node."""
