"""Training CF-CLIP mappers for new prompts (``cfdeploy train``): the official objective, optimiser and
checkpoint format."""
