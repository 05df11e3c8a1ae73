"""Batch jobs that drive a ``VARPipeline`` over many images for evaluation: class-balanced FID sample sets
(``sample_set.py``) and the class-conditional quality report (``quality.py``). They sit above the pipeline and
``eval/``, which therefore never import the pipeline."""
