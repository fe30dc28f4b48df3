"""cryoavg.select."""
