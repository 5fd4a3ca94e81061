"""Training: device and precision, optimizer and schedule, the one train_step, checkpoints, the loop."""
