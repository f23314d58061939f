"""Backends run the stages of an edit (text, mappers, generator) on one runtime each."""
