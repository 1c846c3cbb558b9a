"""SALF inside ``transformers.Trainer``: one train batch per SALF step, every micro-batch at its own cut.

    python examples/hf_trainer.py --model smollm2-135m --dataset trec --limit 960 --max-steps 60
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from common import evaluate_model, load, parser  # noqa: E402

from salf_engine.integrations.hf import SalfTrainer, classification_rows  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    run = load(args)
    cfg = run["config"]
    training = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        report_to=[], save_strategy="no", logging_steps=10, use_cpu=args.cpu, seed=args.seed,
        disable_tqdm=True,
    )
    trainer = SalfTrainer(
        model=run["model"], args=training, processing_class=run["tokenizer"],
        train_dataset=classification_rows(run["train_split"], run["verbalizer"].label_token_ids),
        salf_strategy=cfg.strategy, salf_config=cfg, salf_bases=run["bases"], salf_grad_accum=args.grad_accum,
    )
    trainer.train()
    scores = evaluate_model(trainer.model, run)
    print(f"hf_trainer: {scores}")
    return scores


if __name__ == "__main__":
    main()
