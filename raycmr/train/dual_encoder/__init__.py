"""The dual encoder: contrastive + GRL + DSCMR + distillation over the global batch."""
