"""What the tests share: independent float64 references and instruments (helpers.py), the tiny
training runs and their comparisons (train_utils.py), the prepared-data fixtures (data_fixtures.py)."""
