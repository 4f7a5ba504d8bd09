"""diffusers/transformers weights <-> Flax parameter trees: reading, matching, exporting."""
