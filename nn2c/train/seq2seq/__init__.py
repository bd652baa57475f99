"""Training sequence-to-sequence models: pairs of strings, an encoder over the source, a
decoder with attention over the encoder's outputs (see `network`, `model`, `trainer`)."""
