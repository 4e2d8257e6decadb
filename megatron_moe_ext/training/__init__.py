"""The train entry: launcher, rank entry, data, forward step."""
