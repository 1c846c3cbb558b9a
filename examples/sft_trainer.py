"""SALF inside ``trl.SFTTrainer`` through the mixin (``pip install 'salf-engine[trl]'``).

    python examples/sft_trainer.py --model smollm2-135m --dataset trec --limit 960 --max-steps 60

The rows are already tokenized (prompt + label word, only the label supervised), so TRL's dataset
preparation is skipped; packing and padding-free batches stay off (a packed row would mix cuts).
"""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).parent))
from common import evaluate_model, load, parser  # noqa: E402

from salf_engine.integrations.hf import SalfTrainerMixin, classification_rows  # noqa: E402


class SalfSFTTrainer(SalfTrainerMixin, SFTTrainer):
    """trl.SFTTrainer with SALF step plans."""


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    run = load(args)
    cfg = run["config"]
    training = SFTConfig(
        output_dir=args.output, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        report_to=[], save_strategy="no", logging_steps=10, use_cpu=args.cpu, seed=args.seed,
        disable_tqdm=True, bf16=False, gradient_checkpointing=False, packing=False, padding_free=False,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
    )
    rows = classification_rows(run["train_split"], run["verbalizer"].label_token_ids)
    trainer = SalfSFTTrainer(
        model=run["model"], args=training, processing_class=run["tokenizer"],
        train_dataset=Dataset.from_list(rows),
        salf_strategy=cfg.strategy, salf_config=cfg, salf_bases=run["bases"], salf_grad_accum=args.grad_accum,
    )
    trainer.train()
    scores = evaluate_model(trainer.model, run)
    print(f"sft_trainer: {scores}")
    return scores


if __name__ == "__main__":
    main()
