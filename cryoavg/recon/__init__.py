"""cryoavg.recon."""
