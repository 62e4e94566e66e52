"""Model backends and the model catalog. Nothing here imports `server`."""
