"""SFT (`python -m fastchat.train.train`), multi-turn DPO (`python -m fastchat.train.train_dpo`) and policy-gradient
(`python -m fastchat.train.train_pg`: GRPO, PPO) trainers.

Both train on the assistant turns only, with masks built from token offsets by
`fastchat.conversation.tokenize_with_mask`. DeepSpeed / FSDP configs are in `configs/`.
"""

# written by the policy-gradient trainer after its last step; the pipeline's next update goes on from it (a name here,
# not in train_pg, so that the pipeline's process need not import torch to find it)
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
