"""Operations below the model: attention backends, norms, device and memory queries."""
