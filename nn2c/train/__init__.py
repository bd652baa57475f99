"""The trainer: the training loop, the session behind `nn2c train`, checkpoints, corpora,
progress and logs. May import everything below it (backend, compiler, lang) and nn2run."""
