"""`python -m nn2c …`, as `torchrun --nproc_per_node N -m nn2c train …` runs it."""

import sys

from nn2c.cli import main

sys.exit(main(prog_name="nn2c"))
