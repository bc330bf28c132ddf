"""Analyses: heads refitted, generalisation, goodness errors, equal pairs, recurrent validation."""
