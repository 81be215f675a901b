"""`dsunlearn sweep`: an Optuna study whose trials are real unlearn runs."""
