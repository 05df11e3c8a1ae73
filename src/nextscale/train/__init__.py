"""Training: datasets, samplers and the training loops of the tokenizer and the transformer."""
