# Layer-normalized LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization"). The input
# term and the recurrent term of every gate are normalized separately, each with its own
# gain α and bias β, and so is the cell before its tanh:
#     LN(z; α, β) = α ⊙ (z − μ) ⊘ sqrt(σ² + ε) + β,   μ = mean(z),  σ² = mean((z − μ)²)
# The paper normalizes the four gates' terms together; here each gate's term is
# normalized on its own (the language has no slices), as many implementations do.
# a is a centred input term, r a centred recurrent term; ε = 10⁻⁵.

a_fₜ = W_f xₜ − mean(W_f xₜ)
a_iₜ = W_i xₜ − mean(W_i xₜ)
a_oₜ = W_o xₜ − mean(W_o xₜ)
a_gₜ = W_g xₜ − mean(W_g xₜ)
r_fₜ = U_f hₜ₋₁ − mean(U_f hₜ₋₁)
r_iₜ = U_i hₜ₋₁ − mean(U_i hₜ₋₁)
r_oₜ = U_o hₜ₋₁ − mean(U_o hₜ₋₁)
r_gₜ = U_g hₜ₋₁ − mean(U_g hₜ₋₁)
fₜ = σ(α_xf ⊙ a_fₜ ⊘ sqrt(mean(a_fₜ ⊙ a_fₜ) + 1e-5) + β_xf + α_hf ⊙ r_fₜ ⊘ sqrt(mean(r_fₜ ⊙ r_fₜ) + 1e-5) + β_hf + b_f)
iₜ = σ(α_xi ⊙ a_iₜ ⊘ sqrt(mean(a_iₜ ⊙ a_iₜ) + 1e-5) + β_xi + α_hi ⊙ r_iₜ ⊘ sqrt(mean(r_iₜ ⊙ r_iₜ) + 1e-5) + β_hi + b_i)
oₜ = σ(α_xo ⊙ a_oₜ ⊘ sqrt(mean(a_oₜ ⊙ a_oₜ) + 1e-5) + β_xo + α_ho ⊙ r_oₜ ⊘ sqrt(mean(r_oₜ ⊙ r_oₜ) + 1e-5) + β_ho + b_o)
gₜ = tanh(α_xg ⊙ a_gₜ ⊘ sqrt(mean(a_gₜ ⊙ a_gₜ) + 1e-5) + β_xg + α_hg ⊙ r_gₜ ⊘ sqrt(mean(r_gₜ ⊙ r_gₜ) + 1e-5) + β_hg + b_g)
cₜ = fₜ ⊙ cₜ₋₁ + iₜ ⊙ gₜ
dₜ = cₜ − mean(cₜ)
hₜ = oₜ ⊙ tanh(α_c ⊙ dₜ ⊘ sqrt(mean(dₜ ⊙ dₜ) + 1e-5) + β_c)
