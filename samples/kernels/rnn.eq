# Elman network, the simple recurrent network (Elman 1990).
# Notation as in Wikipedia, "Recurrent neural network", section "Elman networks":
# σ_h is tanh. There is no yₜ equation, so the default readout yₜ = W_y·hₜ + b_y applies.

hₜ = σ_h(W_h xₜ + U_h hₜ₋₁ + b_h)

where σ_h = tanh
