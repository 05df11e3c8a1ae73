"""Evaluation: sample-quality metrics, feature networks (Inception-v3, the small classifier) and the ADM ``.npz``
sample-file format. Generating the samples is ``nextscale.jobs``; the benchmark harness is ``nextscale.bench``."""
