"""The VAR (next-scale, class-conditional) family's sampling machinery: params, plans, state, runner, loops."""
