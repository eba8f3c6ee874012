"""Decoding speed: tokens/s and ms/token of the recurrent step against the baselines, and the report tables."""
