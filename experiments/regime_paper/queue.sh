#!/bin/bash
# The regime study of docs/results.md ("The paper's regime at CPU scale"), as a resumable queue: compare.py reuses
# every finished run (its done.json), so re-running this script continues where it stopped. Run it from a frozen
# worktree of a commit (git worktree add ../wt-regime <commit>) and copy the run records back (no weights).
set -e
cd "$(dirname "$0")/../.."
SYN="--model.lr=1e-4 --trainer.max_steps=-1 --trainer.max_epochs=1 --data.synthetic.num_train=1600 --data.synthetic.noise=0.4 --data.synthetic.label_noise=0.2 --trainer.val_check_interval=25"
ALL="full sstoken_release sstoken random rho1 tokencleaning qtuning"
# 1. the built-in task, seed 0 first (every method), in the order of the questions asked
for methods in "full sstoken_release" "sstoken random" "rho1" "tokencleaning qtuning"; do
  python tools/compare.py --config configs/quickstart.yaml --methods $methods --seeds 0 --data-order-seeds \
    --out experiments/regime_paper/synthetic --extra "$SYN"
done
# 2. seeds 1 and 2, which also change the data order
python tools/compare.py --config configs/quickstart.yaml --methods $ALL --seeds 0 1 2 --data-order-seeds \
  --out experiments/regime_paper/synthetic --extra "$SYN"
# 3. GSM8K train in the same regime (one epoch of 1600 problems = 200 steps), one seed
python tools/compare.py --config configs/gsm8k.yaml --methods $ALL --seeds 0 --data-order-seeds \
  --out experiments/regime_paper/gsm8k --reference-args "--data.max_samples=256 --eval.num_problems=0" \
  --extra "--model.lr=1e-4 --trainer.max_steps=-1 --trainer.max_epochs=1 --data.max_samples=1600 --trainer.val_check_interval=25"
