"""The contenders the workloads measure besides onelayer_fast itself (whose contenders are built in each workload
from the library's own API):

    naive_trl.py   NaiveTRLStep: single-layer GRPO as TRL computes it, in plain PyTorch
    trl_driver.py  TRL's GRPOTrainer driven one update cycle at a time (the [compare] extra)
    liger.py       Liger-Kernel's fused GRPO loss (the [compare] extra)
"""
