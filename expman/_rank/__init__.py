"""What runs inside a training process: start, Experiment, the sender, spool, artifacts, launcher, local collector."""
