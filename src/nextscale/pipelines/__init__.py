"""Pipelines: the user-facing objects (load, move, sample, save), one file per family on one shared base."""
