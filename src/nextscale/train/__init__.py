"""Training: the training loops of the tokenizer and the transformer (datasets and data order: ``nextscale.data``)."""
