"""repablate.train -- the Lightning module, callbacks and the Hydra entry point."""
