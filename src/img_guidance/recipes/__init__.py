"""Training recipes: flat, readable accelerate loops (setup, train, checkpoint, cleanup)."""
