"""Data quality beyond the paper: hard-negative screening under a guide model, sample scores, decontamination."""
