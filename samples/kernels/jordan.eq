# Jordan network (Jordan 1986): the Elman network with the previous output fed back
# instead of the previous hidden state. Notation as in Wikipedia, "Recurrent neural
# network", section "Jordan networks": σ_h is tanh and σ_y the softmax, so yₜ is a
# distribution over the next character and yₜ₋₁ (zero before the first step) the one
# the network gave a step ago. One layer only (--layers 1).

hₜ = σ_h(W_h xₜ + U_h yₜ₋₁ + b_h)
yₜ = σ_y(W_y hₜ + b_y)

where σ_h = tanh, σ_y = softmax
