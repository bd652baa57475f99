# Minimal gated unit (Zhou et al. 2016, "Minimal gated unit for recurrent neural
# networks"): the GRU with one forget gate fₜ doing the work of both zₜ and rₜ.
# Notation as in Wikipedia, "Gated recurrent unit", section "Minimal gated unit":
# σ_g is the sigmoid, φ_h the hyperbolic tangent. Written with the concatenation
# [hₜ₋₁; xₜ] and one weight matrix per gate, as in the paper.

fₜ = σ_g(W_f·[hₜ₋₁; xₜ] + b_f)
ĥₜ = φ_h(W_h·[fₜ ⊙ hₜ₋₁; xₜ] + b_h)
hₜ = (1 − fₜ) ⊙ hₜ₋₁ + fₜ ⊙ ĥₜ

where σ_g = σ, φ_h = tanh
