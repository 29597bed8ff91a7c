"""kdgate gateway package."""
