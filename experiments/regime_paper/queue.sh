#!/bin/bash
# The regime study of docs/results.md ("The paper's regime at CPU scale"), as a resumable queue: compare.py reuses
# every finished run (its done.json), so re-running this script continues where it stopped. Run it from a frozen
# worktree of a commit (git worktree add ../wt-regime <commit>) and copy the run records back (no weights).
set -e
cd "$(dirname "$0")/../.."
PAPER="--model.lr=1e-4 --trainer.max_steps=-1 --trainer.max_epochs=1 --trainer.val_check_interval=25"
NOISE="--data.synthetic.noise=0.4 --data.synthetic.label_noise=0.2"
ALL="full sstoken_release sstoken random rho1 tokencleaning qtuning"
paper() {  # the paper's regime on the built-in task (one epoch of 1600 problems = 200 steps), seeds that reorder
  python tools/compare.py --config configs/quickstart.yaml --data-order-seeds --out experiments/regime_paper/synthetic \
    --extra "$PAPER --data.synthetic.num_train=1600 $NOISE" "$@"
}
# 1. seed 0 of the methods without a reference
paper --methods full sstoken_release --seeds 0
paper --methods sstoken random --seeds 0
# 2. seed 0 of the reference-based methods (the reference, its full+clean row) and Q-Tuning
paper --methods rho1 --seeds 0
paper --methods tokencleaning qtuning --seeds 0
# 3b. random selection at Q-Tuning's budget (it trains on 38% of the response tokens, the others on ~61%)
paper --methods experiments/regime_paper/random_qtuning_budget.yaml --seeds 0
# 3. today's regime (30 steps at lr 1e-3, the config's data order) again, now with retention: seed 0 of each method
#    reproduces experiments/synthetic's seed 0 (the runs are seeded) and adds the retention measures
python tools/compare.py --config configs/quickstart.yaml --methods $ALL --seeds 0 \
  --out experiments/regime_30step/synthetic --extra "$NOISE --trainer.val_check_interval=10"
# 3c. the same regime, seeds 1 and 2 of full, random and sstoken_release: the spread of the retention measures
python tools/compare.py --config configs/quickstart.yaml --methods full random sstoken_release --seeds 1 2 \
  --out experiments/regime_30step/synthetic --extra "$NOISE --trainer.val_check_interval=10"
# 4. seeds 1 and 2: first full, random and sstoken_release (the comparisons the answer turns on), then the rest
paper --methods full random sstoken_release --seeds 0 1 2
paper --methods $ALL --seeds 0 1 2
# 5. GSM8K train in the same regime (one epoch of 1600 problems = 200 steps), one seed
python tools/compare.py --config configs/gsm8k.yaml --methods $ALL --seeds 0 --data-order-seeds \
  --out experiments/regime_paper/gsm8k --reference-args "--data.max_samples=256 --eval.num_problems=0" \
  --extra "$PAPER --data.max_samples=1600"
