"""Video I/O, latent files, planning and running (built by the CLI issue)."""
