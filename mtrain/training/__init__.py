"""The training loop and what it calls: engine, optimizer step, DeepSpeed config, schedule,
checkpoints and resume, step components, memory plan."""
