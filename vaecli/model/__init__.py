"""The SVD temporal VAE and the SD image VAE as plain modules named after the sgm checkpoint keys."""
