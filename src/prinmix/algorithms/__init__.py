"""Pure tensor maths of PrinMix and its baselines: no model, file or CLI imports.

Where each equation of the paper (/work/shared/paper, "PrinMix") lives:

=======================  ==============================================================  =================================
Paper                    What                                                            Code
=======================  ==============================================================  =================================
Eq. 1                    layer output error ‖WX − ŴX‖² (the evaluation metric)           prinmix.evaluate.layer_error
Eq. 2, Eq. 4             per-row error ½ ΔWᵢ H ΔWᵢᵀ minimised by GPTQ                    gptq.gptq_quantize
Eq. 5                    E[i, b] = σᵢ² · ΔVᵢ XXᵀ ΔVᵢᵀ per rank and candidate width       width_simulation.simulate_width_errors
Eq. 6                    Û by GPTQ under H_U = Σ V̂ XXᵀ V̂ᵀ Σ                             compress_matrix.compress_prinmix
Eq. 7                    reconstruction target correction Ũ                              rtc.correct_reconstruction_target
Eq. 8                    exact per-rank width allocation (budget, one-hot, f_max)        allocation.allocate_bits
                         (MILP reference solver)                                         allocation_milp.solve_allocation_milp
Algorithm 1              PrinMix on one matrix: SVD → Eq. 5 → Eq. 8 → V̂ → Eq. 7 → Û     compress_matrix.compress_prinmix
bit budget B, G_b        α · 16 · h_out · h_in bits, every stored byte counted           budget.budget_bits, budget.storage_ratio
=======================  ==============================================================  =================================

Also here: the method registry (methods.py), the baselines Delta-CoMe, low-rank and BitDelta
(baselines.py), min–max quantisation (quantize.py), bit packing (packing.py), the compressed-matrix
type and its stored blob (compressed_linear.py; the blob's byte layout without torch: blob_layout.py), the SVD of a delta or of LoRA factors (lowrank_svd.py).
Entry point for every method: compress_matrix.compress_matrix(ΔW, H, ratio, method, config).
"""
