"""Trainers: thin loops over tether.core, tether.models, tether.data and tether.runs."""
