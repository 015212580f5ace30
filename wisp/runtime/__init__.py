"""Runtimes run a sprite's processes; `base` is the one interface they share."""
