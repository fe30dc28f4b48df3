"""cryoavg.simulate."""
