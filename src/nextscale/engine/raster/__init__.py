"""The raster (LlamaGen, one token at a time) family's sampling machinery: params, state, runner, loops."""
