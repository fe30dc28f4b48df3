"""cryoavg.cli."""
