"""nn2c: the nn2 compiler and SDK — kernel equations in, trained .nnb files out.

Passes, in data-flow order: parse -> check -> lower -> optimize -> emit, with the
PyTorch backend (torch_backend) training the same IR the runtime executes. nn2c may
import the runtime (nn2run); the runtime never imports nn2c.
"""

__version__ = "0.1.0"
