"""SFT (`python -m fastchat.train.train`) and multi-turn DPO (`python -m fastchat.train.train_dpo`) trainers.

Both train on the assistant turns only, with masks built from token offsets by
`fastchat.conversation.tokenize_with_mask`. DeepSpeed / FSDP configs are in `configs/`.
"""
