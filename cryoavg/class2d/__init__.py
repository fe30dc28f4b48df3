"""cryoavg.class2d."""
