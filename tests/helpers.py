"""Small shared pieces of the tests: random SFT batches and a LightningModule that is *not* sstoken_pl's."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

import sstoken_pl


def loader(batches):
    """A DataLoader yielding pre-made batches as they are."""
    return DataLoader(batches, batch_size=None)


def random_batches(n_batches=4, batch_size=4, seq_len=24, vocab=261, seed=0, pad_id=0):
    """Padded SFT batches: a prompt of random length, then a response, then right padding."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
        attn = torch.ones(batch_size, seq_len, dtype=torch.long)
        labels = ids.clone()
        for b in range(batch_size):
            prompt = int(torch.randint(3, seq_len // 2, (1,), generator=g))
            length = int(torch.randint(prompt + 3, seq_len + 1, (1,), generator=g))
            labels[b, :prompt] = -100
            ids[b, length:] = pad_id
            attn[b, length:] = 0
            labels[b, length:] = -100
        batches.append(
            {"input_ids": ids, "attention_mask": attn, "labels": labels, "index": torch.arange(batch_size) + i * batch_size}
        )
    return batches


class ForeignModule(pl.LightningModule):
    """A user's own module: holds a HF model at ``self.model`` and computes its loss with ``sstoken_pl.token_loss``."""

    def __init__(self, model, lr=1e-2):
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sstoken_pl.token_loss(self, batch, logits)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=3,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
