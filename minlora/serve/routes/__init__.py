"""The HTTP routes, one module per part of the API: client (bootstrap, sessions, futures),
training, sampling and rest (runs, checkpoints, archives, sessions)."""
