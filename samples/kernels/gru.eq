# Gated recurrent unit, fully gated version (Cho et al. 2014).
# Notation as in Wikipedia, "Gated recurrent unit", section "Fully gated unit":
# σ_g is the sigmoid, φ_h the hyperbolic tangent; ⊙ is the element-wise product.

zₜ = σ_g(W_z xₜ + U_z hₜ₋₁ + b_z)
rₜ = σ_g(W_r xₜ + U_r hₜ₋₁ + b_r)
ĥₜ = φ_h(W_h xₜ + U_h (rₜ ⊙ hₜ₋₁) + b_h)
hₜ = (1 − zₜ) ⊙ hₜ₋₁ + zₜ ⊙ ĥₜ

where σ_g = σ, φ_h = tanh
