# LSTM with a forget gate (Hochreiter & Schmidhuber 1997; Gers et al. 2000).
# Notation as in Wikipedia, "Long short-term memory", section "LSTM with a forget gate":
# σ_g is the sigmoid, σ_c and σ_h are tanh; ⊙ is the element-wise product.

fₜ = σ_g(W_f xₜ + U_f hₜ₋₁ + b_f)
iₜ = σ_g(W_i xₜ + U_i hₜ₋₁ + b_i)
oₜ = σ_g(W_o xₜ + U_o hₜ₋₁ + b_o)
c̃ₜ = σ_c(W_c xₜ + U_c hₜ₋₁ + b_c)
cₜ = fₜ ⊙ cₜ₋₁ + iₜ ⊙ c̃ₜ
hₜ = oₜ ⊙ σ_h(cₜ)

where σ_g = σ, σ_c = tanh, σ_h = tanh
