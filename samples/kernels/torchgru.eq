# The GRU as PyTorch's torch.nn.GRU computes it (its documentation's notation):
# separate input and hidden biases, and the reset gate applied after the hidden
# product, rₜ ⊙ (W_hn hₜ₋₁ + b_hn), unlike Cho et al.'s rₜ ⊙ hₜ₋₁ (see gru.eq).

rₜ = σ(W_ir xₜ + b_ir + W_hr hₜ₋₁ + b_hr)
zₜ = σ(W_iz xₜ + b_iz + W_hz hₜ₋₁ + b_hz)
nₜ = tanh(W_in xₜ + b_in + rₜ ⊙ (W_hn hₜ₋₁ + b_hn))
hₜ = (1 − zₜ) ⊙ nₜ + zₜ ⊙ hₜ₋₁
