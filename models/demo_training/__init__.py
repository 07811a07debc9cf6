"""The research scripts that made the demo pair (pretraining, the induction toy, the corpus build).

Nothing in the product imports this package; NOTES.md has the runs behind the shipped models.
"""
