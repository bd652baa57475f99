# An LSTM decoder with Luong's general attention (Luong, Pham & Manning 2015).
# The LSTM steps on [xₜ; h̃ₜ₋₁] (input feeding); its state hₜ scores every memory position
# hⱼ through W_a, αₜⱼ weighs them, and the attentional state h̃ₜ = tanh(W_c [cₜ; hₜ]) is
# read by the readout and fed to the next step.

memory hⱼ
fₜ = σ(W_f [xₜ; h̃ₜ₋₁] + U_f hₜ₋₁ + b_f)
iₜ = σ(W_i [xₜ; h̃ₜ₋₁] + U_i hₜ₋₁ + b_i)
oₜ = σ(W_o [xₜ; h̃ₜ₋₁] + U_o hₜ₋₁ + b_o)
gₜ = tanh(W_g [xₜ; h̃ₜ₋₁] + U_g hₜ₋₁ + b_g)
mₜ = fₜ ⊙ mₜ₋₁ + iₜ ⊙ gₜ
hₜ = oₜ ⊙ tanh(mₜ)
eₜⱼ = sum(hⱼ ⊙ (W_a hₜ))
αₜⱼ = softmaxⱼ(eₜⱼ)
cₜ = Σⱼ(αₜⱼ ⊙ hⱼ)
h̃ₜ = tanh(W_c [cₜ; hₜ])
output h̃ₜ
