"""The torch backend: the network built from the IR (per-step autograd), the fused loop,
and the native loop (plan, C renderer, build, driver). May import torch,
nn2c.compiler, nn2c.lang and nn2run."""
