"""Training JointNet: stages 1-3 of the paper, sharded over a (data, fsdp) mesh."""
