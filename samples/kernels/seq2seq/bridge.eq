# A GRU decoder without attention (Cho et al. 2014): the bridge starts the state from the
# encoder's last output hₙ, which also enters every step as the sentence's context.

memory hⱼ
zₜ = σ(W_z xₜ + U_z sₜ₋₁ + C_z hₙ + b_z)
rₜ = σ(W_r xₜ + U_r sₜ₋₁ + C_r hₙ + b_r)
ŝₜ = tanh(W_s xₜ + U_s (rₜ ⊙ sₜ₋₁) + C_s hₙ + b_s)
sₜ = (1 − zₜ) ⊙ sₜ₋₁ + zₜ ⊙ ŝₜ
s₀ = tanh(W_0 hₙ + b_0)
