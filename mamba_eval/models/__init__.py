"""The model core: configuration, checkpoint formats, blocks, the language model, op backends."""
