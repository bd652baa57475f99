# A GRU decoder with additive attention (Bahdanau, Cho & Bengio 2015).
# The memory hⱼ is the encoder's output at position j. Each step scores every position
# against the previous state, αₜⱼ weighs the positions (a softmax over j), and the context
# cₜ, their weighted sum, enters the gates of a GRU written as torch.nn.GRUCell computes it
# (its input is [xₜ; cₜ]). The bridge s₀ starts the decoder from the last encoder output.

memory hⱼ
eₜⱼ = v_a · tanh(W_a sₜ₋₁ + U_a hⱼ)
αₜⱼ = softmaxⱼ(eₜⱼ)
cₜ = Σⱼ(αₜⱼ ⊙ hⱼ)
rₜ = σ(W_ir xₜ + C_r cₜ + b_ir + W_hr sₜ₋₁ + b_hr)
zₜ = σ(W_iz xₜ + C_z cₜ + b_iz + W_hz sₜ₋₁ + b_hz)
nₜ = tanh(W_in xₜ + C_n cₜ + b_in + rₜ ⊙ (W_hn sₜ₋₁ + b_hn))
sₜ = (1 − zₜ) ⊙ nₜ + zₜ ⊙ sₜ₋₁
s₀ = tanh(W_0 hₙ + b_0)
