"""nn2c: the nn2 compiler and SDK — kernel equations in, trained .nnb files out.

Passes, in data-flow order: parse -> check -> lower -> optimize -> emit, with the
PyTorch backend (torch_backend) training the same IR the runtime executes. nn2c may
import the runtime (nn2run); the runtime never imports nn2c. Its own dependencies (torch,
lark, rich) are the package's `train` extra: the `nn2c` script starts in nn2c.launch, which
names what is missing before anything needs it.
"""

__version__ = "0.1.0"
