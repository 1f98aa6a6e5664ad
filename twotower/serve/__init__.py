"""`twotower serve`: an OpenAI-compatible server with block-level continuous batching."""
