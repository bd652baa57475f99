# Elman network as Wikipedia writes it ("Recurrent neural network", section "Elman
# networks"), readout included: σ_y is the softmax, so yₜ is a distribution over the next
# character. The trainer minimizes its negative log-likelihood (log_softmax of
# W_y hₜ + b_y); rnn.eq is the same cell with the readout left to the compiler.

hₜ = σ_h(W_h xₜ + U_h hₜ₋₁ + b_h)
yₜ = σ_y(W_y hₜ + b_y)

where σ_h = tanh, σ_y = softmax
