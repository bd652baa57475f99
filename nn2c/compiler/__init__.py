"""The compiler: the IR, lowering, the optimizer's passes, the backward derived as data,
emitting programs, the pipeline and the `nn2c check` report, export and quantize.
May import nn2c.lang and nn2run; never torch."""
