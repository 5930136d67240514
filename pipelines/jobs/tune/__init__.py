"""`pitome-export tune`: search merge schedules, algorithms and precisions with Optuna for the
fastest export that keeps an accuracy budget (job.py runs it; space.py, trials.py, study.py,
search.py and report.py are its parts)."""
