# Layer-normalized LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization", section 3.1).
# As the paper writes it, the four gates' input terms are normalized together, over the
# 4H values [W_f xₜ; W_i xₜ; W_o xₜ; W_g xₜ], and so are their recurrent terms, each
# with its own gain α and bias β; the cell is normalized before its tanh:
#     LN(z; α, β) = α ⊙ (z − μ) ⊘ sqrt(σ² + ε) + β,   μ = mean(z),  σ² = mean((z − μ)²)
# a is a centred input term, r a centred recurrent term, n and m the normalized ones;
# ε = 10⁻⁵.

a_fₜ = W_f xₜ − mean([W_f xₜ; W_i xₜ; W_o xₜ; W_g xₜ])
a_iₜ = W_i xₜ − mean([W_f xₜ; W_i xₜ; W_o xₜ; W_g xₜ])
a_oₜ = W_o xₜ − mean([W_f xₜ; W_i xₜ; W_o xₜ; W_g xₜ])
a_gₜ = W_g xₜ − mean([W_f xₜ; W_i xₜ; W_o xₜ; W_g xₜ])
r_fₜ = U_f hₜ₋₁ − mean([U_f hₜ₋₁; U_i hₜ₋₁; U_o hₜ₋₁; U_g hₜ₋₁])
r_iₜ = U_i hₜ₋₁ − mean([U_f hₜ₋₁; U_i hₜ₋₁; U_o hₜ₋₁; U_g hₜ₋₁])
r_oₜ = U_o hₜ₋₁ − mean([U_f hₜ₋₁; U_i hₜ₋₁; U_o hₜ₋₁; U_g hₜ₋₁])
r_gₜ = U_g hₜ₋₁ − mean([U_f hₜ₋₁; U_i hₜ₋₁; U_o hₜ₋₁; U_g hₜ₋₁])
n_fₜ = a_fₜ ⊘ sqrt(mean([a_fₜ ⊙ a_fₜ; a_iₜ ⊙ a_iₜ; a_oₜ ⊙ a_oₜ; a_gₜ ⊙ a_gₜ]) + 1e-5)
n_iₜ = a_iₜ ⊘ sqrt(mean([a_fₜ ⊙ a_fₜ; a_iₜ ⊙ a_iₜ; a_oₜ ⊙ a_oₜ; a_gₜ ⊙ a_gₜ]) + 1e-5)
n_oₜ = a_oₜ ⊘ sqrt(mean([a_fₜ ⊙ a_fₜ; a_iₜ ⊙ a_iₜ; a_oₜ ⊙ a_oₜ; a_gₜ ⊙ a_gₜ]) + 1e-5)
n_gₜ = a_gₜ ⊘ sqrt(mean([a_fₜ ⊙ a_fₜ; a_iₜ ⊙ a_iₜ; a_oₜ ⊙ a_oₜ; a_gₜ ⊙ a_gₜ]) + 1e-5)
m_fₜ = r_fₜ ⊘ sqrt(mean([r_fₜ ⊙ r_fₜ; r_iₜ ⊙ r_iₜ; r_oₜ ⊙ r_oₜ; r_gₜ ⊙ r_gₜ]) + 1e-5)
m_iₜ = r_iₜ ⊘ sqrt(mean([r_fₜ ⊙ r_fₜ; r_iₜ ⊙ r_iₜ; r_oₜ ⊙ r_oₜ; r_gₜ ⊙ r_gₜ]) + 1e-5)
m_oₜ = r_oₜ ⊘ sqrt(mean([r_fₜ ⊙ r_fₜ; r_iₜ ⊙ r_iₜ; r_oₜ ⊙ r_oₜ; r_gₜ ⊙ r_gₜ]) + 1e-5)
m_gₜ = r_gₜ ⊘ sqrt(mean([r_fₜ ⊙ r_fₜ; r_iₜ ⊙ r_iₜ; r_oₜ ⊙ r_oₜ; r_gₜ ⊙ r_gₜ]) + 1e-5)
fₜ = σ(α_xf ⊙ n_fₜ + β_xf + α_hf ⊙ m_fₜ + β_hf + b_f)
iₜ = σ(α_xi ⊙ n_iₜ + β_xi + α_hi ⊙ m_iₜ + β_hi + b_i)
oₜ = σ(α_xo ⊙ n_oₜ + β_xo + α_ho ⊙ m_oₜ + β_ho + b_o)
gₜ = tanh(α_xg ⊙ n_gₜ + β_xg + α_hg ⊙ m_gₜ + β_hg + b_g)
cₜ = fₜ ⊙ cₜ₋₁ + iₜ ⊙ gₜ
dₜ = cₜ − mean(cₜ)
hₜ = oₜ ⊙ tanh(α_c ⊙ dₜ ⊘ sqrt(mean(dₜ ⊙ dₜ) + 1e-5) + β_c)
