"""cryoavg.localsym."""
