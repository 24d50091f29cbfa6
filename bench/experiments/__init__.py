"""Experiment drivers: train or score runs and write the result tables quoted in the docs."""
