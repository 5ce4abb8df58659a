"""Training and evaluation: the loop (any trainee that computes its own loss), evaluation (rank classification and
generation, written once), prefix tuning."""
