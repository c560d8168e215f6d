"""The SFT loss the trainer uses; it lives in `branchmerge.lm_loss` so that merging (Fisher
importance) can use it without depending on the trainer."""

from branchmerge.lm_loss import IGNORE, chunked_token_loss_sum, token_loss_sum

__all__ = ["IGNORE", "chunked_token_loss_sum", "token_loss_sum"]
