"""The kernel language: the AST, the parser (lark), error positions, the checker, and
where kernels are found. May import lark and nn2run; never torch."""
