"""Run by tests/test_distributed_contrastive.py under `accelerate launch --num_processes N --cpu`: three
ContrastiveTrainer steps of a tiny AltCLIP-style model (stage 2) on a global batch of 8 pairs, 8 // N per process.
Writes the global loss of every step (the mean of the processes' losses) and the trainable weights to OUT."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from modeling_xclip.tiny import EMBED_DIM, build_tiny_model  # noqa: E402
from training_scripts.contrastive import ContrastiveCollator, ContrastiveTrainer, EmbeddingTable, Rows  # noqa: E402

GLOBAL_BATCH = 8


class RecordingTrainer(ContrastiveTrainer):
    losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # each process holds its local part of the loss; their mean is the loss of the global batch
        self.losses.append(self.accelerator.gather(loss.detach()[None]).mean().item())
        return loss


def main(out):
    model, processor = build_tiny_model("altclip", seed=0)
    for module in model.modules():     # no dropout: both runs must compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.freeze("contrastive")
    generator = torch.Generator().manual_seed(1)
    image_embeds = torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=generator)
    rows = [{"input_ids": [0, *torch.randint(10, 200, (3 + i % 4,), generator=generator).tolist(), 3], "image": i,
             "english": True, "row": i} for i in range(GLOBAL_BATCH)]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=GLOBAL_BATCH // int(
        __import__("os").environ.get("WORLD_SIZE", 1)), max_steps=3, learning_rate=1e-3, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1,
        # the attention key biases have a gradient of zero in exact arithmetic (softmax ignores a shift shared by all
        # keys); at Adam's default eps (1e-8) their float noise of ~1e-9 would become steps of ~lr, differently in each
        # run. A larger eps leaves them still, and every other parameter trains as usual.
        adam_epsilon=1e-6, save_strategy="no", report_to="none", seed=0, use_cpu=True,
        dataloader_drop_last=True)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Rows(rows),
                               data_collator=ContrastiveCollator(processor.tokenizer,
                                                                 EmbeddingTable("image_embeds", image_embeds)))
    trainer.train()
    if trainer.is_world_process_zero():
        trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(Path(out) / "trainable.safetensors"))
        (Path(out) / "losses.json").write_text(json.dumps({"world_size": args.world_size,
                                                           "losses": RecordingTrainer.losses}))


if __name__ == "__main__":
    main(sys.argv[1])
